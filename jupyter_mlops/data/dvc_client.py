"""The one module that talks to DVC (and to git about data): errors mapped in one place.

Reading what a ``.dvc`` file says, and which commit holds it, needs no dvc import (YAML and one
``git`` call); hashing, adding, materialising a past version and remote transfers go through
DVC's in-process API, imported on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, Iterator

from ..errors import (
    DataError,
    NotInRepoError,
    NotTrackedError,
    OutsideRepoError,
    RemoteError,
    UnknownRevisionError,
)
from .versions import DataVersion

__all__ = ["DvcProject", "find_dvc_root"]


def find_dvc_root(start: Path) -> Path | None:
    start = start.resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir():
            return folder
    return None


def _load_yaml(text: str) -> Any:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(text, Loader=loader)  # noqa: S506 - a safe loader


def _version_from_dvcfile(text: str, rel: str, dvcfile: str) -> tuple[str, int, int, str]:
    """(md5, size, nfiles, kind) of the out in a .dvc file's text."""
    try:
        data = _load_yaml(text)
        out = data["outs"][0]
        md5 = str(out["md5"])
    except Exception as e:  # malformed YAML or an unexpected layout
        raise DataError(f"{dvcfile}: not a valid .dvc file ({type(e).__name__}: {e}); fix or re-add {rel}", path=rel) from e
    kind = "dir" if md5.endswith(".dir") else "file"
    return md5, int(out.get("size") or 0), int(out.get("nfiles") or 1), kind


class DvcProject:
    """A git + DVC repository, as the data API needs it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._repo: Any = None

    @classmethod
    def find(cls, start: Path) -> "DvcProject":
        root = find_dvc_root(start)
        if root is None:
            raise NotInRepoError(str(start))
        return cls(root)

    # -- paths ------------------------------------------------------------------------------------

    def rel(self, path: str | os.PathLike[str]) -> str:
        """Repository-relative POSIX path of ``path`` (relative paths are taken from the cwd)."""
        absolute = Path(os.path.abspath(path))
        try:
            return absolute.relative_to(self.root).as_posix()
        except ValueError:
            raise OutsideRepoError(str(path), str(self.root)) from None

    def tracked_target(self, rel: str) -> tuple[str, str]:
        """(tracked path, its .dvc file) for ``rel`` or the folder it lies in."""
        parts = rel.split("/")
        for i in range(len(parts), 0, -1):
            target = "/".join(parts[:i])
            if (self.root / (target + ".dvc")).is_file():
                return target, target + ".dvc"
        raise NotTrackedError(rel)

    # -- what the .dvc file and git say -----------------------------------------------------------

    def recorded(self, target: str, dvcfile: str) -> tuple[str, int, int, str]:
        return _version_from_dvcfile((self.root / dvcfile).read_text(), target, dvcfile)

    def _git(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True, check=False)

    def commit_of(self, dvcfile: str) -> str | None:
        """The commit holding this .dvc file as it is now, or None if that content is uncommitted."""
        if self._git("diff", "--quiet", "HEAD", "--", dvcfile).returncode != 0:
            return None
        if self._git("ls-files", "--error-unmatch", "--", dvcfile).returncode != 0:
            return None
        done = self._git("log", "-1", "--format=%H", "--", dvcfile)
        return done.stdout.strip() or None

    def resolve_rev(self, rev: str) -> str:
        done = self._git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
        if done.returncode != 0:
            raise UnknownRevisionError(rev)
        return done.stdout.strip()

    def version_at(self, rel: str, rev: str) -> DataVersion:
        """The version of ``rel`` that commit ``rev`` records (no workspace access)."""
        commit = self.resolve_rev(rev)
        parts = rel.split("/")
        for i in range(len(parts), 0, -1):
            target = "/".join(parts[:i])
            shown = self._git("show", f"{commit}:{target}.dvc")
            if shown.returncode == 0:
                md5, size, nfiles, kind = _version_from_dvcfile(shown.stdout, target, f"{rev}:{target}.dvc")
                return DataVersion(target, md5, size, nfiles, kind, rev=commit)
        raise NotTrackedError(rel, rev)

    # -- DVC itself -------------------------------------------------------------------------------

    @property
    def repo(self) -> Any:
        if self._repo is None:
            _route_dvc_output()
            from dvc.repo import Repo

            self._repo = Repo(str(self.root))
        return self._repo

    def close(self) -> None:
        if self._repo is not None:
            self._repo.close()
            self._repo = None

    def hash_workspace(self, target: str) -> tuple[str, int, int]:
        """(md5, size, nfiles) of the bytes on disk, through DVC's hashing and state cache."""
        from dvc_data.hashfile.build import build

        repo = self.repo
        try:
            _, meta, obj = build(repo.cache.local, str(self.root / target), repo.fs, "md5",
                                 ignore=repo.dvcignore, dry_run=True)
        except OSError as e:
            raise DataError(f"cannot read {target}: {e.strerror or e}", path=target) from e
        return obj.hash_info.value, int(meta.size or 0), int(meta.nfiles or 1)

    def add(self, *targets: str) -> None:
        """Version ``targets`` with DVC, in one DVC call. Every previous ``.dvc`` file survives
        any failure."""
        previous = {}
        for target in targets:
            dvcfile = self.root / (target + ".dvc")
            previous[dvcfile] = dvcfile.read_bytes() if dvcfile.exists() else None
        try:
            for target in targets:
                if (self.root / target).is_file():
                    self._prefill_cache(self.root / target)
            with _dvc_errors(", ".join(targets)):
                # relink=False: keep the workspace copy, no copy back
                self.repo.add([str(self.root / t) for t in targets], relink=False)
        except BaseException:
            for dvcfile, content in previous.items():
                _restore(dvcfile, content)
            raise

    def _prefill_cache(self, path: Path) -> None:
        """Hash and copy into the cache at once (two threads; both release the GIL), then tell
        DVC's state the hash, so DVC's own add finds the work done and only writes the .dvc file."""
        from dvc_data.hashfile.hash_info import HashInfo

        odb = self.repo.cache.local
        cache_dir = Path(odb.path)
        result: dict[str, Any] = {}

        def digest() -> None:
            h = hashlib.md5()
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            result["md5"] = h.hexdigest()

        tmp = cache_dir / f".mlops-{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DataError(f"the DVC cache {cache_dir} is read-only or not writable ({e.strerror}): fix its "
                            "permissions or point DVC at another (dvc cache dir PATH)", path=str(cache_dir)) from e
        hasher = threading.Thread(target=digest, daemon=True)
        hasher.start()
        copied = False
        try:
            shutil.copyfile(path, tmp)
            hasher.join()
            copied = "md5" in result
        except OSError as e:
            raise DataError(f"cannot copy {path.name} into the DVC cache {cache_dir} ({e.strerror}): "
                            "is it read-only or full?", path=str(path)) from e
        finally:
            if not copied:  # interrupted or failed: leave no partial object behind
                tmp.unlink(missing_ok=True)
        if path.stat().st_size != tmp.stat().st_size:  # the file changed while we read it
            tmp.unlink(missing_ok=True)
            return  # let DVC hash and copy it the slow way
        dest = Path(odb.oid_to_path(result["md5"]))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
        self.repo.state.save(str(path), self.repo.fs, HashInfo("md5", result["md5"]))

    def fetch(self, version: DataVersion, dest: Path) -> None:
        """Write the bytes of a past version to ``dest`` (which must not exist), from the DVC
        cache or, when DVC can, its remote. Raises :class:`DataError` naming what to do."""
        from dvc.api import DVCFileSystem

        with _dvc_errors(version.path):
            fs = DVCFileSystem(url=str(self.root), rev=version.rev)
            fs.get(version.path, str(dest), recursive=version.kind == "dir")

    def md5_of(self, path: Path, kind: str) -> str:
        """DVC's md5 of the file or folder at ``path`` (a folder's ends in ``.dir``), wherever it
        lies: no .dvcignore applies, so every file counts."""
        if kind != "dir":
            h = hashlib.md5()
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(1 << 22):
                    h.update(chunk)
            return h.hexdigest()
        from dvc_data.hashfile.build import build

        repo = self.repo
        with _dvc_errors(str(path)):
            _, _, obj = build(repo.cache.local, str(path), repo.fs, "md5", dry_run=True)
        return str(obj.hash_info.value)

    def push(self, targets: list[str] | None = None) -> int:
        self.close()  # a transfer is long next to opening the repo: start from DVC's current view
        with _dvc_errors("push", remote=True):
            return int(self.repo.push([str(self.root / t) for t in targets] if targets else None))

    def pull(self, targets: list[str] | None = None) -> dict[str, Any]:
        self.close()
        with _dvc_errors("pull", remote=True):
            return self.repo.pull([str(self.root / t) for t in targets] if targets else None)


#: Where DVC's own output goes: its log records, its console writes and its status lines.
log = logging.getLogger("jupyter_mlops.data.dvc")
_routed = False
_route_lock = threading.Lock()


class _DvcLogHandler(logging.Handler):
    """DVC's log records, re-logged under ours at debug (info for its warnings): they are hints
    for DVC's CLI ("To track the changes with git, run: ..."); our own messages say what to do,
    and any DVC failure reaches the user as an exception mapped by :func:`_dvc_errors`."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record must not break the DVC call it came from
            message = str(record.msg)
        log.log(logging.INFO if record.levelno >= logging.WARNING else logging.DEBUG, "%s: %s", record.name, message)


class _LogStream(io.TextIOBase):
    """A text stream whose lines go to our log: DVC's console writes and rich consoles."""

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False  # no colours, spinners or cursor moves

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                log.debug("dvc: %s", line.rstrip())
        return len(text)


def _route_dvc_output() -> None:
    """Send everything DVC would print to our log, once per process, before any call into DVC.

    In-process DVC writes to the terminal through three channels: tqdm progress bars (shown when
    stderr is a TTY: a pipeline's live display in a terminal, interleaved with its redraws), its
    ``ui`` console (``print`` and rich status spinners such as "Checking graph"), and its loggers
    (without a handler, logging's last resort prints their warnings to stderr). Redirecting
    ``sys.stdout``/``sys.stderr`` would also swallow what other threads print (the live display
    itself), so each channel is routed at its source instead. Process-wide on purpose: it holds
    for every DVC call, from any thread, without a window between calls.
    """
    global _routed
    if _routed:
        return
    with _route_lock:
        if _routed:
            return
        import functools

        from dvc.ui import Console, ui
        from rich.console import Console as RichConsole

        # DVC's and dvc-data's tqdm bars disable themselves above this level (dvc/progress.py,
        # dvc_data/callbacks.py): the lock wait message is such a bar too
        for name in ("dvc.progress", "dvc_data.callbacks"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
        from dvc.logger import LoggerHandler

        handler = _DvcLogHandler()
        for name in ("dvc", "dvc_data", "dvc_objects", "scmrepo"):
            logger = logging.getLogger(name)
            for installed in list(logger.handlers):  # `import dvc` attaches its CLI's stdout/stderr handlers
                if isinstance(installed, LoggerHandler):
                    logger.removeHandler(installed)
            logger.addHandler(handler)
            logger.propagate = False
            if logger.level == logging.NOTSET or logger.level < logging.INFO:
                logger.setLevel(logging.INFO)  # DVC's debug chatter costs time and says nothing to us
        stream = _LogStream()
        console = RichConsole(file=stream, force_terminal=False, no_color=True, width=120)
        ui.__dict__["rich_console"] = console  # functools.cached_property: the instance's dict wins
        ui.__dict__["error_console"] = console

        @functools.wraps(Console.write)
        def write(*objects: Any, file: Any = None, **kwargs: Any) -> None:
            return Console.write(ui, *objects, file=stream, **kwargs)

        ui.write = write
        _routed = True


def _restore(dvcfile: Path, previous: bytes | None) -> None:
    try:
        if previous is None:
            if dvcfile.exists():
                dvcfile.unlink()
        elif not dvcfile.exists() or dvcfile.read_bytes() != previous:
            tmp = dvcfile.with_name(dvcfile.name + ".restore")
            tmp.write_bytes(previous)
            os.replace(tmp, dvcfile)
    except OSError:
        pass


# DVC's plug-ins for remotes that an extra of ours installs (the others are named as they are)
_EXTRAS = {"dvc-s3": "s3"}


@contextlib.contextmanager
def _dvc_errors(what: str, *, remote: bool = False) -> Iterator[None]:
    """DVC's exceptions as ours, with the one line that says what to do."""
    _route_dvc_output()
    from dvc.exceptions import DvcException

    first_failure = _FirstFailure() if remote else None
    try:
        with first_failure or contextlib.nullcontext():
            yield
    except DataError:
        raise
    except DvcException as e:
        text = " ".join(str(e).split())
        kind = type(e).__name__
        if kind == "NoRemoteError" or "no remote" in text.lower():
            raise RemoteError(f"{what}: no DVC remote is configured: add one with `dvc remote add -d NAME URL` "
                              "(or run `jupyter mlops init` for a local one)") from e
        if kind == "LockError":  # DVC's own text carries a coloured link meant for its CLI
            raise DataError(f"{what}: another DVC process holds this project's lock (.dvc/tmp/lock): wait for "
                            "it to finish; if none is running, delete .dvc/tmp/lock", path=what) from e
        if kind == "ConfirmRemoveError" or "without confirmation" in text:
            raise DataError(f"{what} would overwrite local changes ({text.split('confirmation.')[-1].split('force.')[-1].strip()}): "
                            "version them with `%mlops data add` first, or discard them") from e
        if kind in ("DownloadError", "UploadError") or (remote and kind != "CheckoutError"):
            cause = first_failure.error if first_failure else None
            if cause is not None and type(cause).__module__.startswith("botocore."):
                raise RemoteError(_s3_failure(what, cause)) from e
            if first_failure and first_failure.message:
                text += f" (the first: {first_failure.message})"
            raise RemoteError(f"{what}: the DVC remote failed: {text}") from e
        raise DataError(f"{what}: {text}", path=what) from e
    except ImportError as e:
        # DVC's plug-in for the remote's scheme is missing: "s3 is supported, but requires 'dvc-s3' ..."
        missing = re.match(r"(\w+) is supported, but requires '([\w-]+)'", str(e))
        if missing is None:
            raise
        scheme, package = missing.groups()
        extra = _EXTRAS.get(package)
        install = f"pip install 'jupyter_mlops[{extra}]'" if extra else f"pip install {package}"
        raise RemoteError(f"{what}: the DVC remote is on {scheme}, which needs the {package} package: {install}") from e
    except OSError as e:
        if remote:
            raise RemoteError(f"{what}: the DVC remote cannot be used ({e.strerror or e}: {e.filename}); check "
                              "its URL with `dvc remote list` and that it is reachable and writable") from e
        if isinstance(e, PermissionError):
            raise DataError(f"{what}: permission denied on {e.filename}: is the DVC cache or the folder read-only?",
                            path=what) from e
        if not isinstance(e, FileNotFoundError):
            raise DataError(f"{what}: {e.strerror or e} ({e.filename})", path=what) from e
        raise DataError(f"{what}: {e.filename or e} does not exist", path=what) from e
    except Exception as e:
        # DVC lets the S3 client's own errors through (no credentials, no server at the endpoint)
        if remote and type(e).__module__.startswith("botocore."):
            raise RemoteError(_s3_failure(what, e)) from e
        raise


class _FirstFailure(logging.Handler):
    """The first error DVC logs during a transfer: DVC logs why each file failed and raises only
    "N files failed to upload", so the reason is taken from its log."""

    _loggers = ("dvc", "dvc_data")

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.message = ""
        self.error: BaseException | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if not self.message:
            self.error = record.exc_info[1] if record.exc_info else None
            self.message = " ".join(record.getMessage().split()) + (f" - {self.error}" if self.error else "")

    def __enter__(self) -> "_FirstFailure":
        for name in self._loggers:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self._loggers:
            logging.getLogger(name).removeHandler(self)


def _s3_failure(what: str, error: BaseException) -> str:
    """One line for an error of botocore's (DVC's S3 plug-in), saying what to set."""
    kind = type(error).__name__
    if kind in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"{what}: no credentials for the S3 remote: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "in the environment (or name a profile: `dvc remote modify NAME profile PROFILE`)")
    text = " ".join(str(error).split())
    if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError"):
        return (f"{what}: the S3 remote does not answer ({text}): check that it is up, and its endpointurl "
                "(`dvc remote modify NAME endpointurl URL`)")
    return f"{what}: the S3 remote failed: {text}"
