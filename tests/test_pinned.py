"""Private read-only copies of past versions (data/pinned.py), against real git + DVC revisions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jupyter_mlops import data
from jupyter_mlops.errors import DataError

from .conftest import Project
from .test_data import commit, mlops_dvc, mlops_two_revisions  # noqa: F401 - fixtures


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_pinned_version_is_read_only_and_an_altered_copy_is_never_served(mlops_two_revisions: Project) -> None:
    old = data.use("data/train.csv", rev="v1")
    images = data.use("data/images", rev="v1")
    assert _mode(old) == 0o444 and _mode(images) == 0o555 and _mode(images / "0.txt") == 0o444

    os.chmod(old, 0o644)
    old.write_text("x,y\n6,6\n")  # same size, new bytes
    again = data.use("data/train.csv", rev="v1")
    assert again.read_text() == "x,y\n1,2\n" and _mode(again) == 0o444

    inode = os.stat(again).st_ino
    os.utime(again, ns=(time.time_ns(), time.time_ns()))  # touched only: the bytes are still v1's
    assert data.use("data/train.csv", rev="v1") == again and os.stat(again).st_ino == inode

    os.chmod(images, 0o755)
    (images / "extra.txt").write_text("not in v1\n")
    os.chmod(images / "1.txt", 0o644)
    (images / "1.txt").write_text("image 9\n")
    assert data.use("data/images/1.txt", rev="v1").read_text() == "image 1\n"
    assert sorted(p.name for p in images.iterdir()) == [f"{i}.txt" for i in range(5)]
    assert _mode(images) == 0o555
    assert data.use("data/images/0.txt", rev="v1").read_text() == "image 0\n"
    assert (mlops_two_revisions.root / "data" / "images" / "0.txt").read_text() == "new image\n"


def test_an_altered_copy_dvc_cannot_fetch_again_is_an_error_and_gone(mlops_two_revisions: Project) -> None:
    old = data.use("data/train.csv", rev="v1")
    md5 = data.version("data/train.csv", rev="v1").md5
    os.chmod(old, 0o644)
    old.write_text("tampered\n")
    (mlops_two_revisions.root / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    with pytest.raises(DataError, match=r"was altered .*pull it with `%mlops data pull`") as info:
        data.use("data/train.csv", rev="v1")
    assert "\n" not in str(info.value)
    assert not old.exists()


def test_kernels_materialising_one_version_at_once_share_one_intact_copy(mlops_dvc: Project) -> None:
    many = mlops_dvc.root / "data" / "many"
    many.mkdir()
    for i in range(300):  # long enough to fetch that the processes overlap
        (many / f"{i}.txt").write_text(f"file {i}\n")
    data.add("data/many")
    commit(mlops_dvc, "v1", tag="v1")
    code = ("import sys\nfrom pathlib import Path\nfrom jupyter_mlops import data\nimport dvc.api\n"
            "print('ready', flush=True)\nsys.stdin.readline()\n"
            "p = data.use('data/many', rev='v1')\n"
            "print(p, sorted((f.name, f.read_text()) for f in Path(p).iterdir()), flush=True)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=mlops_dvc.root, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:  # all imported: they start materialising together
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0] * 4, [err for _, err in results]
    assert len({out for out, _ in results}) == 1
    assert results[0][0].count("'file ") == 300 and "('7.txt', 'file 7\\n')" in results[0][0]
    versions = mlops_dvc.root / ".mlops" / "data" / "versions"
    assert not [p for p in versions.rglob("*") if p.name.startswith((".tmp-", ".altered-"))]
