"""``jupyter mlops init``: make a folder a git + DVC project with the embedded defaults."""

from __future__ import annotations

import subprocess
from pathlib import Path

from ..config import EMBEDDED_DIR
from ..errors import DataError

__all__ = ["init_project", "LOCAL_REMOTE"]

#: The embedded default remote: a folder beside the project's other local state.
LOCAL_REMOTE = Path(EMBEDDED_DIR) / "dvc-remote"


def _git(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, check=False)


def init_project(folder: Path) -> list[str]:
    """Set up what is missing (git, DVC, ``.mlops/``, a local DVC remote); return what was done.

    Idempotent: a second call changes nothing and returns an empty list.
    """
    folder = folder.resolve()
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder", path=str(folder))
    done = []
    inside = _git(folder, "rev-parse", "--show-toplevel")
    if inside.returncode != 0:
        created = _git(folder, "init", "-q")
        if created.returncode != 0:
            raise DataError(f"git init failed in {folder}: {created.stderr.strip()}", path=str(folder))
        done.append("initialised a git repository")
        git_root = folder
    else:
        git_root = Path(inside.stdout.strip()).resolve()
    embedded = folder / EMBEDDED_DIR
    if not embedded.is_dir():
        embedded.mkdir()
        done.append(f"created {EMBEDDED_DIR}/ (local state, ignored by git)")
    if not (embedded / ".gitignore").exists():
        (embedded / ".gitignore").write_text("# local state of jupyter_mlops: never commit it\n*\n")
    from .dvc_client import _route_dvc_output

    _route_dvc_output()
    from dvc.repo import Repo

    if not (folder / ".dvc").is_dir():
        Repo.init(str(folder), subdir=git_root != folder).close()
        done.append("initialised DVC (.dvc/)")
    repo = Repo(str(folder))
    try:
        with repo.config.edit() as config:
            remotes = config.get("remote", {})
            if not remotes:
                remote = folder / LOCAL_REMOTE
                remote.mkdir(parents=True, exist_ok=True)
                config.setdefault("remote", {})["local"] = {"url": str(remote)}
                config.setdefault("core", {})["remote"] = "local"
                done.append(f"added the default DVC remote 'local' at {LOCAL_REMOTE} (point it at S3 or "
                            "another remote to share data: dvc remote add -d NAME URL)")
    finally:
        repo.close()
    return done
