"""DVC remotes on S3 for real (moto's server on loopback, started by the tests).

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION) and the endpoint from the DVC remote's ``endpointurl``, as a team on MinIO or
another S3 API would configure them. Every test has a bucket of its own on one moto server for the
session (the fixtures are in conftest.py); MLflow artifacts on S3 are in test_s3_artifacts.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from jupyter_mlops import data
from jupyter_mlops.data.project import init_project
from jupyter_mlops.errors import RemoteError

from .conftest import Project, cell_text, execute_notebook, git, make_notebook
from .s3_server import Bucket, StallingRelay, s3_client

pytestmark = pytest.mark.s3


def use_s3_remote(root: Path, url: str, endpoint: str) -> None:
    """Make ``url`` (with ``endpoint``) the project's default DVC remote, as `dvc remote add -d`."""
    from dvc.repo import Repo

    repo = Repo(str(root))
    try:
        with repo.config.edit() as config:
            config["remote"]["s3"] = {"url": url, "endpointurl": endpoint}
            config["core"]["remote"] = "s3"
    finally:
        repo.close()


@pytest.fixture
def mlops_s3_dvc(mlops_project: Project, mlops_s3: Bucket) -> Iterator[Project]:
    """The test project with its DVC remote in the bucket (``store/``), some data, setup committed."""
    init_project(mlops_project.root)
    use_s3_remote(mlops_project.root, mlops_s3.url("store"), mlops_s3.endpoint)
    git(mlops_project.root, "add", "-A")
    git(mlops_project.root, "commit", "-qm", "setup")
    (mlops_project.root / "data" / "images").mkdir(parents=True)
    (mlops_project.root / "data" / "train.csv").write_text("x,y\n1,2\n")
    for i in range(5):
        (mlops_project.root / "data" / "images" / f"{i}.bin").write_bytes(os.urandom(1000 + i))
    yield mlops_project
    data.api._projects.clear()


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_content_addressed(objects: dict[str, bytes], prefix: str) -> None:
    """Every object of a DVC remote is named by the md5 of its bytes: none is partial or foreign."""
    for key, body in objects.items():
        assert key.startswith(prefix + "files/md5/"), key
        name = key.removeprefix(prefix + "files/md5/").replace("/", "").removesuffix(".dir")
        assert hashlib.md5(body).hexdigest() == name, f"{key} holds {len(body)} bytes that are not its md5"


def wipe_local_copies(root: Path) -> None:
    shutil.rmtree(root / ".dvc" / "cache")
    (root / "data" / "train.csv").unlink()
    shutil.rmtree(root / "data" / "images")


# -- DVC remote on S3 ------------------------------------------------------------------------------


def test_push_wipe_and_pull_give_back_the_same_bytes(mlops_s3_dvc: Project, mlops_s3: Bucket) -> None:
    root = mlops_s3_dvc.root
    data.add("data/train.csv", "data/images")
    before = files_under(root / "data")
    assert data.push() == 7  # 1 file, 5 images and the folder's manifest
    objects = mlops_s3.objects()
    assert len(objects) == 7
    assert_content_addressed(objects, "store/")
    assert data.push() == 0  # everything is there already
    wipe_local_copies(root)
    data.pull()
    assert files_under(root / "data") == before


def test_without_the_s3_extra_push_and_pull_say_what_to_install(mlops_s3_dvc: Project,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    data.add("data/train.csv")
    monkeypatch.setitem(sys.modules, "dvc_s3", None)  # as if dvc-s3 were not installed
    for transfer in (data.push, data.pull):
        with pytest.raises(RemoteError) as info:
            transfer()
        message = str(info.value)
        assert "pip install 'jupyter_mlops[s3]'" in message and "\n" not in message


def test_the_extras_that_errors_name_exist_and_install_what_is_missing() -> None:
    import re
    import tomllib

    from jupyter_mlops.data import dvc_client
    from jupyter_mlops.tracking import client

    from .conftest import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {extra: {re.split(r"[\[<>=~!; ]", req, maxsplit=1)[0].lower() for req in reqs}
             for extra, reqs in extras.items()}
    for package, extra in dvc_client._EXTRAS.items():  # DVC plug-ins: named by their distribution
        assert package in names.get(extra, set()), f"jupyter_mlops[{extra}] does not install {package}"
    for module, extra in client._EXTRAS.items():  # modules MLflow imports
        assert extra in names, f"an error names jupyter_mlops[{extra}] for {module}, which pyproject.toml lacks"
    assert {"dvc-s3", "boto3"} <= names["s3"] <= names["test"]


def test_missing_credentials_are_one_line_naming_the_variables(mlops_s3_dvc: Project,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    data.add("data/train.csv")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    for transfer in (data.push, data.pull):
        with pytest.raises(RemoteError) as info:
            transfer()
        message = str(info.value)
        assert "AWS_ACCESS_KEY_ID" in message and "\n" not in message


def test_an_endpoint_nobody_answers_on_is_one_line_naming_it(mlops_s3_dvc: Project) -> None:
    from .conftest import free_port

    nobody = f"http://127.0.0.1:{free_port()}"
    use_s3_remote(mlops_s3_dvc.root, "s3://bucket/store", nobody)
    data.add("data/train.csv")
    with pytest.raises(RemoteError) as info:
        data.push()
    message = str(info.value)
    assert nobody in message and "endpointurl" in message and "\n" not in message


def test_a_bucket_that_does_not_exist_is_named_in_the_error(mlops_s3_dvc: Project, mlops_s3: Bucket) -> None:
    use_s3_remote(mlops_s3_dvc.root, "s3://no-such-bucket-here/store", mlops_s3.endpoint)
    data.add("data/train.csv")
    with pytest.raises(RemoteError) as info:
        data.push()
    message = str(info.value)
    assert "bucket does not exist" in message and "\n" not in message


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jupyter_mlops", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_cli_pushes_and_pulls_and_says_what_is_wrong_in_one_line(mlops_s3_dvc: Project) -> None:
    root = mlops_s3_dvc.root
    data.add("data/train.csv", "data/images")
    images = files_under(root / "data" / "images")
    pushed = cli("data", "push")
    assert pushed.returncode == 0 and "Pushed 7 file(s)" in pushed.stdout, pushed.stderr
    wipe_local_copies(root)
    pulled = cli("data", "pull", "data/images")
    assert pulled.returncode == 0 and "Pulled: " in pulled.stdout, pulled.stderr
    assert files_under(root / "data" / "images") == images
    assert not (root / "data" / "train.csv").exists()  # only what was named

    no_keys = {k: v for k, v in os.environ.items() if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    refused = cli("data", "pull", env=no_keys)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert [line for line in refused.stderr.splitlines() if line.startswith("error: ")] == [
        "error: pull: no credentials for the S3 remote: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "in the environment (or name a profile: `dvc remote modify NAME profile PROFILE`)"]


def test_the_data_magics_push_and_pull_through_s3_in_a_real_kernel(mlops_s3_dvc: Project) -> None:
    root = mlops_s3_dvc.root
    nb = make_notebook(root / "s3.ipynb", [
        "%load_ext jupyter_mlops",
        "%mlops data add data/train.csv data/images",
        "%mlops data push",
        "import shutil, pathlib\n"
        "before = {p: p.read_bytes() for p in pathlib.Path('data').rglob('*') if p.is_file()}\n"
        "shutil.rmtree('.dvc/cache'); shutil.rmtree('data/images'); pathlib.Path('data/train.csv').unlink()",
        "%mlops data pull",
        "after = {p: p.read_bytes() for p in pathlib.Path('data').rglob('*') if p.is_file()}\n"
        "print('same bytes' if after == before else f'differ: {sorted(set(before) ^ set(after))}')",
        "import sys\nsys.modules['dvc_s3'] = None  # as if dvc-s3 were not installed\n%mlops data push",
    ])
    executed = execute_notebook(nb, allow_errors=True)
    assert "Pushed 7 file(s)" in cell_text(executed, 2)
    assert "Pulled: " in cell_text(executed, 4)
    assert cell_text(executed, 5).strip() == "same bytes"
    error = cell_text(executed, 6)
    assert "pip install 'jupyter_mlops[s3]'" in error and "Traceback" not in error


def test_two_users_pushing_the_same_data_at_once_both_succeed_and_share_it(
    mlops_s3_dvc: Project, mlops_s3: Bucket, tmp_path: Path
) -> None:
    """Two clones start pushing together into one remote: the same folder (same bytes, so the same objects)
    and a file of their own each. Objects are named by their md5, so writing one twice is writing
    the same bytes: both pushes succeed, and each clone pulls back its own data."""
    images = os.urandom(3000)
    clones = {}
    for user in ("ann", "bob"):
        clone = tmp_path / user
        git(tmp_path, "clone", "-q", str(mlops_s3_dvc.root), str(clone))
        (clone / "data" / "images").mkdir(parents=True)
        for i in range(20):
            (clone / "data" / "images" / f"{i}.bin").write_bytes(images[i * 150:(i + 1) * 150])
        (clone / "data" / f"{user}.bin").write_bytes(os.urandom(5000))
        data.add(clone / "data" / "images", clone / "data" / f"{user}.bin", record=False, start=clone)
        clones[user] = (clone, files_under(clone / "data"))
    pushers = [subprocess.Popen([sys.executable, "-m", "jupyter_mlops", "data", "push"], cwd=clone,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for clone, _ in clones.values()]
    outputs = [p.communicate(timeout=300)[0] for p in pushers]
    assert [p.returncode for p in pushers] == [0, 0], outputs

    objects = mlops_s3.objects()
    assert len(objects) == 20 + 1 + 2  # the shared images and their manifest once, a file each
    assert_content_addressed(objects, "store/")
    for user, (clone, before) in clones.items():
        shutil.rmtree(clone / ".dvc" / "cache")
        shutil.rmtree(clone / "data" / "images")
        (clone / "data" / f"{user}.bin").unlink()
        pulled = subprocess.run([sys.executable, "-m", "jupyter_mlops", "data", "pull"], cwd=clone,
                                capture_output=True, text=True, timeout=300)
        assert pulled.returncode == 0, pulled.stderr
        assert files_under(clone / "data") == before
def test_a_push_killed_midway_leaves_the_remote_consistent_and_resumes(
    mlops_project: Project, mlops_s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jupyter mlops data push` of a folder of 200 files, killed (SIGKILL) after 40 uploads landed and while
    the next ones are halfway through their bodies; then pushed again, then pulled into a fresh
    clone. The relay in front of the S3 server stalls those uploads, so the kill lands mid-upload
    every time without a timing guess.

    S3 stores an object only once its whole body arrived, and so does moto (it answers 400 to a
    body cut short and stores nothing), so a partial object could only come from a client writing
    one object in pieces: DVC's S3 plug-in sends files under 100 MiB in one PUT, as these are; the
    multipart case is the next test. What moto cannot show: a real network's failures between a
    complete body and its answer (the object is stored, the client never hears so); the next push
    then finds the object and skips it, as it does for those that landed here.
    """
    root = mlops_project.root
    relay = StallingRelay(mlops_s3.endpoint, allow=40)
    try:
        init_project(root)
        use_s3_remote(root, mlops_s3.url("store"), relay.endpoint)
        many = root / "data" / "many"
        many.mkdir(parents=True)
        for i in range(200):
            (many / f"{i:03}.bin").write_bytes(os.urandom(2000 + 37 * i))
        (folder,) = data.add("data/many", record=False)
        git(root, "add", "-A")
        git(root, "commit", "-qm", "data")
        log = tmp_path / "pusher.log"
        with open(log, "wb") as out:
            pusher = subprocess.Popen([sys.executable, "-m", "jupyter_mlops", "data", "push"],
                                      cwd=root, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert relay.stalled.wait(120), f"the push never got past 40 uploads: {log.read_text()[-2000:]}"
        finally:
            pusher.kill()
            pusher.wait()
        relay.release()

        landed = mlops_s3.objects()
        assert 0 < len(landed) <= 40
        assert_content_addressed(landed, "store/")
        manifest = "store/files/md5/" + folder.md5[:2] + "/" + folder.md5[2:]
        assert manifest not in landed  # DVC sends a folder's manifest only after all its files

        assert data.push() == 201 - len(landed)  # resumes: what landed is not sent again
        complete = mlops_s3.objects()
        assert len(complete) == 201 and manifest in complete
        assert_content_addressed(complete, "store/")
    finally:
        relay.close()

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(root), str(clone))
    use_s3_remote(clone, mlops_s3.url("store"), mlops_s3.endpoint)  # the relay is gone: the server itself
    monkeypatch.chdir(clone)
    data.pull()
    assert files_under(clone / "data" / "many") == files_under(many)


def test_a_multipart_push_killed_midway_leaves_no_object_and_resumes(
    mlops_project: Project, mlops_s3: Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file big enough for a multipart upload (DVC's S3 plug-in, s3fs, sends files of 100 MiB and
    more in 50 MiB parts), its push killed while its second part is halfway: the bucket lists no
    object for it (S3 shows an object only once its upload is completed), the next push sends it
    whole, and a fresh clone pulls identical bytes. The abandoned upload's parts stay in the bucket
    (S3 bills them until a lifecycle rule aborts incomplete multipart uploads): moto keeps them too."""
    root = mlops_project.root
    relay = StallingRelay(mlops_s3.endpoint, allow=1)
    try:
        init_project(root)
        use_s3_remote(root, mlops_s3.url("store"), relay.endpoint)
        big = root / "model.bin"
        with open(big, "wb") as out:
            for _ in range(101):
                out.write(os.urandom(2**20))
        (version,) = data.add("model.bin", record=False)
        git(root, "add", "-A")
        git(root, "commit", "-qm", "model")
        log = tmp_path / "pusher.log"
        with open(log, "wb") as out:
            pusher = subprocess.Popen([sys.executable, "-m", "jupyter_mlops", "data", "push"],
                                      cwd=root, stdout=out, stderr=subprocess.STDOUT)
        try:
            assert relay.stalled.wait(120), f"the push never got past its first part: {log.read_text()[-2000:]}"
        finally:
            pusher.kill()
            pusher.wait()
        relay.release()

        s3 = s3_client(mlops_s3.endpoint)
        assert mlops_s3.objects() == {}
        assert len(s3.list_multipart_uploads(Bucket=mlops_s3.name).get("Uploads", [])) == 1

        assert data.push() == 1
        complete = mlops_s3.objects()
        assert list(complete) == ["store/files/md5/" + version.md5[:2] + "/" + version.md5[2:]]
        assert_content_addressed(complete, "store/")
    finally:
        relay.close()

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(root), str(clone))
    use_s3_remote(clone, mlops_s3.url("store"), mlops_s3.endpoint)
    monkeypatch.chdir(clone)
    data.pull()
    assert hashlib.md5((clone / "model.bin").read_bytes()).hexdigest() == version.md5
