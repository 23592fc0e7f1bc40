"""``jupyter mlops init``: make a folder a git + DVC project with the embedded defaults."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

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
            done.extend(_local_remote(config, folder))
    finally:
        repo.close()
    return done


def _local_remote(config: dict[str, Any], folder: Path) -> list[str]:
    """Add the embedded remote to the committed ``.dvc/config``, relative to ``.dvc/``.

    Relative, because ``.dvc/config`` is committed: an absolute path sent every clone's pushes to
    the original checkout's folder (or nowhere, on another machine), while DVC resolves a relative
    local remote against the folder of the config file that names it, so each clone gets its own
    ``.mlops/dvc-remote``. Not ``.dvc/config.local``: it outranks ``.dvc/config``, so a default
    remote set there would silently shadow the shared remote a team later commits.
    A remote an older ``init`` wrote with an absolute path is made relative the same way.
    """
    from dvc.config_schema import RelPath

    remote = folder / LOCAL_REMOTE
    remotes = config.get("remote", {})
    if not remotes:
        remote.mkdir(parents=True, exist_ok=True)
        config.setdefault("remote", {})["local"] = {"url": RelPath(str(remote))}  # saved relative to .dvc/
        config.setdefault("core", {})["remote"] = "local"
        return [f"added the default DVC remote 'local' at {LOCAL_REMOTE} (point it at S3 or another remote "
                "to share data: dvc remote add -d NAME URL)"]
    url = remotes.get("local", {}).get("url")
    ours = url is not None and Path(url).parts[-2:] == LOCAL_REMOTE.parts
    if ours and not isinstance(url, RelPath) and os.path.isabs(url):  # loaded relative paths are RelPaths
        remote.mkdir(parents=True, exist_ok=True)
        remotes["local"]["url"] = RelPath(str(remote))
        return [f"made the DVC remote 'local' relative ({LOCAL_REMOTE}; it was {url}, which breaks every "
                "clone): commit .dvc/config"]
    return []
