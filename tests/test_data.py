"""Versioned data against a real git + DVC repository and a real local DVC remote."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from jupyter_mlops import data, tracking
from jupyter_mlops.data.project import init_project
from jupyter_mlops.errors import DataError, NotInRepoError, NotTrackedError, OutsideRepoError, RemoteError, UnknownRevisionError
from jupyter_mlops.tracking.flusher import sync

from .conftest import Project, cell_text, execute_notebook, find_run, git, make_notebook


@pytest.fixture
def mlops_dvc(mlops_project: Project) -> Iterator[Project]:
    """The test project, initialised by `jupyter mlops init`, with some data and the setup committed."""
    init_project(mlops_project.root)
    git(mlops_project.root, "add", "-A")
    git(mlops_project.root, "commit", "-qm", "setup")
    (mlops_project.root / "data" / "images").mkdir(parents=True)
    (mlops_project.root / "data" / "train.csv").write_text("x,y\n1,2\n")
    for i in range(5):
        (mlops_project.root / "data" / "images" / f"{i}.txt").write_text(f"image {i}\n")
    yield mlops_project
    data.api._projects.clear()


def start(project: Project) -> tracking.Run:
    return tracking.start_run(experiment="data", capture_context=False, config=project.config(flusher_autostart=False))


def commit(project: Project, message: str, tag: str | None = None) -> None:
    git(project.root, "add", "-A")
    git(project.root, "commit", "-qm", message)
    if tag:
        git(project.root, "tag", tag)


def test_init_is_idempotent_and_sets_up_a_local_remote(mlops_project: Project) -> None:
    done = init_project(mlops_project.root)
    assert any("DVC" in line for line in done) and any("remote" in line for line in done)
    assert (mlops_project.root / ".dvc").is_dir()
    assert "remote = local" in (mlops_project.root / ".dvc" / "config").read_text()
    assert init_project(mlops_project.root) == []


def test_outside_a_dvc_project_add_names_the_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.csv").write_text("1")
    with pytest.raises(NotInRepoError, match="jupyter mlops init"):
        data.add("f.csv")


def test_add_and_use_are_recorded_on_the_run_with_versions(mlops_dvc: Project) -> None:
    run = start(mlops_dvc)
    out_file, out_dir = data.add("data/train.csv", "data/images")
    assert out_dir.kind == "dir" and out_dir.nfiles == 5 and out_dir.md5.endswith(".dir")
    assert (mlops_dvc.root / "data" / "train.csv.dvc").is_file()
    assert data.use("data/train.csv") == mlops_dvc.root / "data" / "train.csv"
    run.end(log_notebook=False)
    sync(mlops_dvc.spool)

    found = find_run(mlops_dvc, "data")
    datasets = {(d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context")): d.dataset
                for d in found.inputs.dataset_inputs}
    assert set(datasets) == {("data/train.csv", "output"), ("data/images", "output")}  # MLflow keeps one per version
    images = datasets[("data/images", "output")]
    assert images.digest == out_dir.digest and images.source_type == "dvc"
    assert json.loads(images.profile) == {"modified": False, "nfiles": 5, "size": out_dir.size}
    client = mlops_dvc.client()
    lineage = json.loads(Path(client.download_artifacts(found.info.run_id, "lineage.json")).read_text())
    assert [v["path"] for v in lineage["inputs"]] == ["data/train.csv"]
    assert sorted(v["path"] for v in lineage["outputs"]) == ["data/images", "data/train.csv"]
    assert lineage["changed_during_run"] == []


def test_a_change_between_use_and_end_is_reported(mlops_dvc: Project) -> None:
    data.add("data/train.csv")
    commit(mlops_dvc, "v1")
    run = start(mlops_dvc)
    recorded = data.use("data/train.csv")
    assert data.version("data/train.csv").rev == git(mlops_dvc.root, "rev-parse", "HEAD").strip()
    (mlops_dvc.root / "data" / "train.csv").write_text("x,y\n9,9\n")
    assert [(c.state, c.recorded.path) for c in data.status()] == [("changed", "data/train.csv")]
    run.end(log_notebook=False)
    sync(mlops_dvc.spool)
    assert recorded.exists()
    assert find_run(mlops_dvc, "data").data.tags["mlops.data.changed_during_run"] == "data/train.csv"


def test_using_modified_data_records_what_was_read(mlops_dvc: Project) -> None:
    data.add("data/train.csv")
    (mlops_dvc.root / "data" / "train.csv").write_text("changed\n")
    found = data.version("data/train.csv")
    assert found.modified and found.rev is None
    import hashlib

    assert found.md5 == hashlib.md5(b"changed\n").hexdigest()


def test_a_past_revision_is_read_without_touching_the_workspace(mlops_two_revisions: Project) -> None:
    mlops_dvc = mlops_two_revisions
    old = data.use("data/train.csv", rev="v1")
    assert old.read_text() == "x,y\n1,2\n"
    assert data.use("data/images/0.txt", rev="v1").read_text() == "image 0\n"
    assert (mlops_dvc.root / "data" / "train.csv").read_text() == "x,y\n3,4\n"
    assert data.version("data/train.csv", rev="v1").rev == git(mlops_dvc.root, "rev-parse", "v1").strip()
    assert git(mlops_dvc.root, "status", "--porcelain") == ""


def test_status_calls_a_past_revision_pinned_not_unchanged(mlops_two_revisions: Project) -> None:
    run = start(mlops_two_revisions)
    data.use("data/train.csv", rev="v1")
    data.use("data/images")
    (mlops_two_revisions.root / "data" / "train.csv").write_text("x,y\n5,6\n")  # the workspace moves on
    changes = data.status()
    assert [(c.state, c.role, c.recorded.path) for c in changes] == [("pinned", "input", "data/train.csv"),
                                                                     ("unchanged", "input", "data/images")]
    assert changes[0].recorded.rev == git(mlops_two_revisions.root, "rev-parse", "v1").strip()
    run.end(log_notebook=False)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda root: data.use("/etc/hostname"), OutsideRepoError, "outside the project"),
        (lambda root: data.use("data/missing.csv"), DataError, "does not exist"),
        (lambda root: data.use("data/train.csv", rev="no-such-tag"), UnknownRevisionError, "unknown git revision"),
        (lambda root: data.use("data/train.csv", rev="HEAD"), NotTrackedError, "not versioned with DVC at revision HEAD"),
        (lambda root: data.use("data/train.csv"), NotTrackedError, "%mlops data add data/train.csv"),
        (lambda root: data.add(), DataError, "name at least one"),
    ],
)
def test_bad_input_is_one_clear_line(mlops_dvc: Project, call, error: type, match: str) -> None:
    with pytest.raises(error, match=match) as info:
        call(mlops_dvc.root)
    assert "\n" not in str(info.value)


def test_push_and_pull_through_the_local_remote(mlops_dvc: Project) -> None:
    data.add("data/train.csv", "data/images")
    assert data.push() == 7  # 1 file, 5 images and the folder's manifest
    shutil.rmtree(mlops_dvc.root / ".dvc" / "cache")
    (mlops_dvc.root / "data" / "train.csv").unlink()
    shutil.rmtree(mlops_dvc.root / "data" / "images")
    data.pull()
    assert (mlops_dvc.root / "data" / "train.csv").read_text() == "x,y\n1,2\n"
    assert len(list((mlops_dvc.root / "data" / "images").iterdir())) == 5


def test_an_unreachable_remote_says_so(mlops_dvc: Project) -> None:
    subprocess.run([sys.executable, "-m", "dvc", "remote", "modify", "local", "url", "/proc/no-such-remote"],
                   cwd=mlops_dvc.root, check=True, capture_output=True)
    data.add("data/train.csv")
    with pytest.raises(RemoteError, match="remote"):
        data.push()


def test_a_read_only_cache_is_a_clear_error_and_keeps_the_previous_version(mlops_dvc: Project, mlops_readonly_dir: Path) -> None:
    data.add("data/train.csv")
    before = (mlops_dvc.root / "data" / "train.csv.dvc").read_text()
    subprocess.run([sys.executable, "-m", "dvc", "cache", "dir", str(mlops_readonly_dir)],
                   cwd=mlops_dvc.root, check=True, capture_output=True)
    data.api._projects.clear()
    (mlops_dvc.root / "data" / "train.csv").write_text("new\n")
    with pytest.raises(DataError, match="read-only"):
        data.add("data/train.csv")
    assert (mlops_dvc.root / "data" / "train.csv.dvc").read_text() == before


def test_an_interrupted_add_leaves_the_previous_version_intact(mlops_dvc: Project) -> None:
    big = mlops_dvc.root / "data" / "big.bin"
    big.write_bytes(b"v1")
    data.add("data/big.bin")
    before = (mlops_dvc.root / "data" / "big.bin.dvc").read_text()
    with open(big, "wb") as f:  # large enough that the add is still copying when interrupted
        for _ in range(64):
            f.write(os.urandom(4 << 20))
    # SIGINT as a terminal delivers it (a shell starts background jobs with it ignored)
    code = ("import signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "from jupyter_mlops import data\ndata.add('data/big.bin')\nprint('finished')\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=mlops_dvc.root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    cache = mlops_dvc.root / ".dvc" / "cache" / "files" / "md5"
    deadline = time.monotonic() + 60
    while not any(cache.glob(".mlops-*.tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, "the add ended before it could be interrupted"
        time.sleep(0.005)  # waiting for the copy into the cache to begin
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert "finished" not in out and "KeyboardInterrupt" in err
    assert (mlops_dvc.root / "data" / "big.bin.dvc").read_text() == before
    assert not any(cache.glob(".mlops-*.tmp"))  # no half object left to look complete


def test_an_unchanged_check_needs_no_dvc(mlops_dvc: Project) -> None:
    data.add("data/images")
    code = ("import sys\nfrom jupyter_mlops import data\nv = data.version('data/images')\n"
            "print(v.modified, 'dvc' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=mlops_dvc.root, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


def test_the_data_magics_in_a_real_kernel(mlops_dvc: Project) -> None:
    nb = make_notebook(mlops_dvc.root / "prep.ipynb", [
        "%load_ext jupyter_mlops\n%mlops track --experiment magics",
        "%mlops data add data/train.csv data/images",
        "p = %mlops data use data/train.csv\nprint(open(p).read())",
        "import subprocess\nsubprocess.run(['git', 'add', '-A'], check=True)\n"
        "subprocess.run(['git', 'commit', '-qm', 'v1'], check=True)\n%mlops data use data/images@HEAD",
        "%mlops data status",
        "%mlops data use nowhere.csv",
        "%mlops data push",
        "%mlops end",
    ])
    executed = execute_notebook(nb, allow_errors=True)
    assert "Versioned data/train.csv" in cell_text(executed, 1) and "5 files" in cell_text(executed, 1)
    assert "x,y" in cell_text(executed, 2)
    status = [line.split()[:3] for line in cell_text(executed, 4).splitlines()]
    assert ["unchanged", "input", "data/train.csv"] in status and ["pinned", "input", "data/images"] in status
    head = git(mlops_dvc.root, "rev-parse", "HEAD").strip()
    assert f"at git {head[:10]}" in cell_text(executed, 4)
    error = cell_text(executed, 5)
    assert "UsageError" in error and "does not exist" in error and "Traceback" not in error
    assert "Pushed 7 file(s)" in cell_text(executed, 6)
    sync(mlops_dvc.spool)
    assert {d.dataset.name for d in find_run(mlops_dvc, "magics").inputs.dataset_inputs} == {"data/train.csv", "data/images"}


def test_pull_over_local_changes_refuses_and_says_what_to_do(mlops_dvc: Project) -> None:
    data.add("data/train.csv")
    data.push()
    (mlops_dvc.root / "data" / "train.csv").write_text("local edit\n")
    (mlops_dvc.root / "data" / "train.csv.dvc").write_text((mlops_dvc.root / "data" / "train.csv.dvc").read_text())
    shutil.rmtree(mlops_dvc.root / ".dvc" / "cache")
    with pytest.raises(DataError, match="overwrite local changes") as info:
        data.pull()
    assert not isinstance(info.value, RemoteError)
    assert (mlops_dvc.root / "data" / "train.csv").read_text() == "local edit\n"


def test_dvc_hints_do_not_reach_the_notebook(mlops_dvc: Project) -> None:
    code = "from jupyter_mlops import data\ndata.add('data/train.csv')\n"
    done = subprocess.run([sys.executable, "-c", code], cwd=mlops_dvc.root, capture_output=True, text=True, check=True)
    assert "To track the changes with git" not in done.stdout + done.stderr
    assert (mlops_dvc.root / "data" / "train.csv.dvc").is_file()


@pytest.fixture
def mlops_dvc_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    """DVC as it behaves in a terminal: its tqdm bars skip their is-a-TTY check, rich consoles
    made from now on draw their spinners."""
    monkeypatch.setenv("DVC_IGNORE_ISATTY", "1")
    monkeypatch.setenv("FORCE_COLOR", "1")


def test_dvc_output_goes_to_the_log_not_the_terminal(mlops_dvc: Project, mlops_dvc_on_a_terminal: None,
                                                      capfd: pytest.CaptureFixture[str],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import hashlib

    caplog.set_level("DEBUG", logger="jupyter_mlops.data.dvc")
    train, images = data.add("data/train.csv", "data/images")
    assert data.push() == 7
    shutil.rmtree(mlops_dvc.root / ".dvc" / "cache")
    (mlops_dvc.root / "data" / "train.csv").unlink()
    data.pull()
    out, err = capfd.readouterr()
    assert out == "" and all(line.startswith("note: no active run") for line in err.splitlines()), err
    assert train.md5 == hashlib.md5(b"x,y\n1,2\n").hexdigest() and images.nfiles == 5
    assert data.version("data/train.csv").md5 == train.md5
    assert "To track the changes with git" in caplog.text  # DVC's hints are in the log


def test_a_locked_dvc_repo_is_one_clear_error_and_no_lock_message(mlops_dvc: Project, mlops_dvc_on_a_terminal: None,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, zc.lockfile\nlock = zc.lockfile.LockFile('.dvc/tmp/lock')\n"
                               "print('locked', flush=True)\nsys.stdin.read()"],
        cwd=mlops_dvc.root, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(DataError, match=r"another DVC process .*\.dvc/tmp/lock") as info:
            data.add("data/train.csv")
    finally:
        holder.communicate("")
    assert "\n" not in str(info.value) and "\x1b" not in str(info.value)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # DVC drew its lock-wait bar here ("\r!\r \r\r...")
    assert not (mlops_dvc.root / "data" / "train.csv.dvc").exists()


def test_a_pipeline_run_prints_only_its_own_lines(mlops_dvc: Project, mlops_dvc_on_a_terminal: None,
                                                  capfd: pytest.CaptureFixture[str]) -> None:
    from jupyter_mlops.cli import main as cli

    make_notebook(mlops_dvc.root / "make.ipynb", ["import pathlib\npathlib.Path('data/made.txt').write_text('made')"])
    (mlops_dvc.root / "pipeline.yaml").write_text(
        "name: quiet\nsteps:\n  make:\n    notebook: make.ipynb\n    outputs: [data/made.txt]\n")
    capfd.readouterr()
    assert cli(["pipeline", "run", "pipeline.yaml", "--no-progress"]) == 0
    out, err = capfd.readouterr()
    states = [re.fullmatch(r"\[\d\d:\d\d:\d\d\] make: (\w+).*", line) for line in err.splitlines()]
    assert all(states) and [m.group(1) for m in states if m] == ["running", "succeeded"], err
    assert "pipeline quiet succeeded" in out and not any(c in out + err for c in "\r\x1b")
    assert (mlops_dvc.root / "data" / "made.txt.dvc").is_file()


@pytest.fixture
def mlops_two_revisions(mlops_dvc: Project) -> Project:
    """data/train.csv and data/images at tag v1, changed and versioned again at v2 (checked out)."""
    data.add("data/train.csv", "data/images")
    commit(mlops_dvc, "v1", tag="v1")
    (mlops_dvc.root / "data" / "train.csv").write_text("x,y\n3,4\n")
    (mlops_dvc.root / "data" / "images" / "0.txt").write_text("new image\n")
    data.add("data/train.csv", "data/images")
    commit(mlops_dvc, "v2")
    return mlops_dvc


def test_init_writes_a_relative_remote_so_a_clone_pushes_and_pulls_its_own(mlops_dvc: Project, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    from jupyter_mlops.cli import main as cli

    config = (mlops_dvc.root / ".dvc" / "config").read_text()
    assert "url = ../.mlops/dvc-remote" in config and str(mlops_dvc.root) not in config
    data.add("data/train.csv")
    assert data.push() == 1
    commit(mlops_dvc, "data")
    clone = tmp_path / "elsewhere" / "clone"
    subprocess.run(["git", "clone", "-q", str(mlops_dvc.root), str(clone)], check=True, capture_output=True)
    assert cli(["init", str(clone)]) == 0
    said = capsys.readouterr().out
    assert "created .mlops/" in said and "DVC" not in said  # its local state only: nothing to commit
    assert (clone / ".dvc" / "config").read_text() == config
    monkeypatch.chdir(clone)
    (clone / "data" / "mine.csv").write_text("the clone's own data\n")
    (mine,) = data.add("data/mine.csv")
    assert data.push() == 1
    (clone / "data" / "mine.csv").unlink()
    shutil.rmtree(clone / ".dvc" / "cache")
    data.pull("data/mine.csv")
    assert (clone / "data" / "mine.csv").read_text() == "the clone's own data\n"
    objects = {p.parent.name + p.name for p in (clone / ".mlops" / "dvc-remote").rglob("*") if p.is_file()}
    assert mine.md5 in objects
    original = {p.parent.name + p.name for p in (mlops_dvc.root / ".mlops" / "dvc-remote").rglob("*") if p.is_file()}
    assert mine.md5 not in original
    assert ".mlops" not in git(clone, "status", "--porcelain", "--untracked-files=all")


def test_init_makes_an_absolute_remote_of_an_older_init_relative(mlops_dvc: Project) -> None:
    config = mlops_dvc.root / ".dvc" / "config"
    config.write_text(config.read_text().replace("../.mlops/dvc-remote", str(mlops_dvc.root / ".mlops" / "dvc-remote")))
    assert any("made the DVC remote 'local' relative" in line for line in init_project(mlops_dvc.root))
    assert "url = ../.mlops/dvc-remote" in config.read_text()
    assert init_project(mlops_dvc.root) == []
