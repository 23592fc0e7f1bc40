"""The command of a step's pod, and the wire format between it and the runner that made the Job.

There is no volume the runner and a pod share, so everything travels through the two channels a
Job has anyway:

* **in, through the container's environment**: the notebook, without its outputs (papermill
  clears them before running), zlib-compressed and base64-encoded, split over
  ``MLOPS_STEP_NOTEBOOK_0..N-1`` (``MLOPS_STEP_NOTEBOOK_PARTS`` = N) because Linux refuses to
  ``execve`` any single environment string over 128 KiB; the parameters as JSON
  (``MLOPS_STEP_PARAMETERS``). :func:`notebook_env` caps the whole at :data:`MAX_NOTEBOOK` so the
  Job stays far below the API server's 1.5 MiB object limit;
* **out, through the pod's log** (stdout, read with ``pods/log``, followed while the pod runs):
  lines starting ``@mlops:``. ``cell N M`` as code cell N of M starts; the executed notebook and
  the runs ``%mlops track`` recorded in the pod's spool, each framed by ``begin NAME SHA256 SIZE``
  / ``end NAME`` around base64 lines of its zlib-compressed bytes; ``error TEXT`` (one line) when
  the notebook failed. Every write is whole lines of at most 4 KiB through one ``os.write``, so
  output of other processes in the container (the kernel's warnings) never splits a line of ours.

``python -m jupyter_mlops.k8s.step_entry`` runs the notebook with papermill on a kernel of the
image (``MLOPS_STEP_KERNEL``, default ``python3``) in a fresh folder, prints the result as above
and exits 0 (succeeded), 1 (a cell raised), 2 (it could not run) or 143 (SIGTERM: the Job's
deadline or a cancel; the partial notebook is printed first). As PID 1 of its container it must
handle SIGTERM itself: the kernel ignores signals it has no handler for in PID 1.

Imports only the standard library at module level: the runner side imports this module too.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["COMMAND", "MAX_NOTEBOOK", "StepLog", "notebook_env", "receive_spool", "main"]

COMMAND = ["python", "-m", "jupyter_mlops.k8s.step_entry"]
PREFIX = b"@mlops:"
#: base64 characters per environment variable: below Linux's 128 KiB MAX_ARG_STRLEN
CHUNK = 96 * 1024
#: base64 characters of the (compressed, output-free) notebook a Job may carry
MAX_NOTEBOOK = 8 * CHUNK
#: the pod's tracked runs (as a tar) come back up to this size; beyond it they stay behind, said so
MAX_SPOOL = 32 * 2**20
#: the most a payload may say it holds once decompressed
MAX_PAYLOAD = 2**30
_LINE = 76  # base64 per log line
_SPOOL_MEMBER = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*/[A-Za-z0-9._/-]+$")
_WRITE = 4096  # PIPE_BUF: one os.write of at most this is never interleaved with another process's


# -- in: the notebook through the environment --------------------------------------------------------


def notebook_env(notebook: bytes, name: str, parameters: Mapping[str, Any], kernel: str = "python3") -> dict[str, str]:
    """The environment that carries ``notebook`` (the .ipynb file's bytes) and ``parameters``.

    Raises ``ValueError`` saying how large it is when it cannot travel in a Job (over
    :data:`MAX_NOTEBOOK` base64 characters once its outputs are dropped and it is compressed).
    """
    nb = json.loads(notebook)
    for cell in nb.get("cells") or []:
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
    packed = base64.b64encode(zlib.compress(json.dumps(nb, separators=(",", ":")).encode(), 9)).decode()
    if len(packed) > MAX_NOTEBOOK:
        raise ValueError(f"the notebook is {len(packed) // 1024} KiB compressed without its outputs; a step on "
                         f"Kubernetes carries at most {MAX_NOTEBOOK // 1024} KiB in its Job: move the large "
                         "text (embedded data, long strings) out of the notebook into data files")
    env = {f"MLOPS_STEP_NOTEBOOK_{i}": packed[start:start + CHUNK]
           for i, start in enumerate(range(0, len(packed), CHUNK))}
    env.update({"MLOPS_STEP_NOTEBOOK_PARTS": str(len(env)), "MLOPS_STEP_NOTEBOOK_NAME": name,
                "MLOPS_STEP_PARAMETERS": json.dumps(dict(parameters), default=str), "MLOPS_STEP_KERNEL": kernel})
    return env


def _read_notebook(environ: Mapping[str, str]) -> bytes:
    parts = int(environ["MLOPS_STEP_NOTEBOOK_PARTS"])
    return zlib.decompress(base64.b64decode("".join(environ[f"MLOPS_STEP_NOTEBOOK_{i}"] for i in range(parts))))


# -- out: framed lines in the log ------------------------------------------------------------------------


def _emit(lines: list[bytes]) -> None:
    """Whole lines, in writes of at most 4 KiB (atomic on a pipe)."""
    batch = b""
    for line in lines:
        line = line + b"\n"
        if batch and len(batch) + len(line) > _WRITE:
            _write(batch)
            batch = b""
        batch += line
    if batch:
        _write(batch)


def _write(data: bytes) -> None:
    while data:
        data = data[os.write(1, data):]


def _payload_lines(name: str, data: bytes) -> list[bytes]:
    packed = base64.b64encode(zlib.compress(data, 6))
    lines = [PREFIX + f"begin {name} {hashlib.sha256(data).hexdigest()} {len(data)}".encode()]
    lines += [PREFIX + b"data " + packed[i:i + _LINE] for i in range(0, len(packed), _LINE)]
    return lines + [PREFIX + f"end {name}".encode()]


def _one_line(text: str, most: int = 2000) -> str:
    return " ".join(str(text).split())[:most]


class StepLog:
    """The runner's reading of a step pod's log: fed bytes as they arrive, in any pieces.

    ``cells``: the latest (N, M); ``error``: the notebook's one-line failure; :meth:`payload` the
    executed notebook (``"notebook"``) or the pod's spool as a tar (``"spool"``), each checked
    against its SHA-256 (None when absent, cut short or damaged); ``lines``: everything else the
    container printed (the last 2,000 lines).
    """

    def __init__(self, on_cell: Callable[[int, int], None] | None = None) -> None:
        self.on_cell = on_cell
        self.cells: tuple[int, int] | None = None
        self.error: str | None = None
        self.warnings: list[str] = []
        self.lines: list[str] = []
        self._payloads: dict[str, bytes] = {}
        self._open: tuple[str, str, int, list[bytes]] | None = None  # name, sha256, size, chunks
        self._rest = b""

    def feed(self, data: bytes) -> None:
        data = self._rest + data
        *complete, self._rest = data.split(b"\n")
        for line in complete:
            self._line(line.rstrip(b"\r"))

    def close(self) -> None:
        if self._rest:
            self._line(self._rest)
            self._rest = b""

    def payload(self, name: str) -> bytes | None:
        return self._payloads.get(name)

    def _line(self, line: bytes) -> None:
        if not line.startswith(PREFIX):
            self.lines.append(line.decode("utf-8", "replace"))
            del self.lines[:-2000]
            return
        kind, _, rest = line[len(PREFIX):].partition(b" ")
        text = rest.decode("utf-8", "replace")
        if kind == b"data" and self._open is not None:
            self._open[3].append(rest)
        elif kind == b"cell":
            match = re.fullmatch(r"(\d+) (\d+)", text)
            if match:
                self.cells = (int(match[1]), int(match[2]))
                if self.on_cell is not None:
                    self.on_cell(*self.cells)
        elif kind == b"begin":
            fields = text.split()
            ok = len(fields) == 3 and fields[2].isdigit() and int(fields[2]) <= MAX_PAYLOAD
            self._open = (fields[0], fields[1], int(fields[2]), []) if ok else None
        elif kind == b"end" and self._open is not None:
            name, digest, size, chunks = self._open
            self._open = None
            stream = zlib.decompressobj()
            try:  # never more than it says it is (a pod runs user code: no zip bomb gets through)
                data = stream.decompress(base64.b64decode(b"".join(chunks)), size + 1)
            except (ValueError, zlib.error):
                return
            if stream.eof and len(data) == size and hashlib.sha256(data).hexdigest() == digest:
                self._payloads[name] = data
        elif kind == b"error":
            self.error = text
        elif kind == b"warning":
            self.warnings.append(text)


def receive_spool(data: bytes, spool_dir: Path, *, tracking_uri: str, artifact_root: str | None,
                  attach_spool_id: str | None) -> list[str]:
    """Put the runs the pod tracked into the runner's spool, where its uploader sends them on; the
    spool ids taken.

    The tar comes from a pod that runs user code, and the uploader acts as the runner's user. So: only
    plain files under a run's own folder are taken; a run must record into the step's own run or a
    new one (not another run of this spool, nor an MLflow run by id); its artifact records must name
    files inside the run's folder; its destination is rewritten to the runner's tracking URI and
    artifact root; a run folder that exists here is never written into; and each run appears at once
    (renamed into place), so the uploader never reads one half-copied.
    """
    import shutil
    import tarfile
    import tempfile

    spool_dir.mkdir(parents=True, exist_ok=True)
    incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=spool_dir))
    taken = []
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and _SPOOL_MEMBER.match(m.name)
                       and ".." not in m.name.split("/") and m.name.split("/")[0] != "done"]
            # the "data" filter where this Python has it (3.10.12+); the checks above hold either way
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(incoming, members=members, **safe)
        runs = sorted(p for p in incoming.iterdir() if p.is_dir())
        for run in runs:
            header = _acceptable(run, attach_spool_id, {r.name for r in runs})
            if header is None or (spool_dir / run.name).exists():
                continue
            header.update(tracking_uri=tracking_uri, artifact_root=artifact_root)
            (run / "run.json").write_text(json.dumps(header))
            os.rename(run, spool_dir / run.name)
            taken.append(run.name)
    except (tarfile.TarError, OSError):
        pass  # what could not be taken stays out; the step's own run still has its notebook
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return taken


def _acceptable(run: Path, attach_spool_id: str | None, received: set[str]) -> dict[str, Any] | None:
    """The run's header if the run may be uploaded as the runner's user (see :func:`receive_spool`)."""
    try:
        header = json.loads((run / "run.json").read_text())
        if not isinstance(header, dict) or header.get("spool_id") != run.name or header.get("run_id") \
                or header.get("attach_spool_id") not in (None, attach_spool_id) \
                or header.get("parent_spool_id") not in (None, *received):
            return None
        events = (run / "events.log").read_text() if (run / "events.log").exists() else ""
        for line in events.splitlines():
            if line.startswith("a\t"):
                src = json.loads(line.split("\t")[1])["src"]
                if not isinstance(src, str) or src.startswith("/") or ".." in src.split("/"):
                    return None
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None
    return header


# -- the pod's side ----------------------------------------------------------------------------------------


def _spool_tar(spool: Path) -> bytes | None:
    """The runs recorded in the pod's spool as a tar (what the runner's uploader needs of them)."""
    import tarfile

    runs = sorted(p for p in spool.iterdir() if p.is_dir() and (p / "run.json").is_file()) if spool.is_dir() else []
    if not runs:
        return None
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for run in runs:
            for path in sorted(run.rglob("*")):
                if path.is_file() and path.name not in ("writer.lock", "upload.lock", "state.json"):
                    tar.add(path, arcname=path.relative_to(spool).as_posix(), recursive=False)
    return buffer.getvalue()


def _execute(src: Path, out: Path, parameters: dict[str, Any], kernel: str) -> tuple[int, str | None]:
    """(exit code, the one-line error): 0 ran, 1 a cell raised, 2 it could not run, 143 SIGTERM."""
    try:  # the imports too: a SIGTERM may come while they take their second
        return _papermill(src, out, parameters, kernel)
    except KeyboardInterrupt:
        return 143, "stopped by SIGTERM (the Job's deadline, or the run was cancelled)"


def _papermill(src: Path, out: Path, parameters: dict[str, Any], kernel: str) -> tuple[int, str | None]:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from ..errors import NotebookFailed
    from ..pipelines.notebook import failed_cell, register_engine

    def cell(n: int, m: int) -> None:
        _emit([PREFIX + f"cell {n} {m}".encode()])

    register_engine()  # papermill on a kernel of this image, with cell progress and sparse saves
    try:
        papermill.execute_notebook(str(src), str(out), parameters=parameters, kernel_name=kernel, language="python",
                                   progress_bar=False, log_output=False, engine_name="mlops", cwd=str(src.parent),
                                   mlops_setup=None, mlops_on_cell=cell)
    except PapermillExecutionError as e:
        where = NotebookFailed(src, out, *(failed_cell(out) or (None, None)), "").where
        return 1, f"{where} raised {e.ename}: {e.evalue}"
    except Exception as e:  # the kernel died or could not start, papermill refused the notebook...
        return 2, f"{type(e).__name__}: {e}"
    return 0, None


def main() -> int:
    import signal
    import tempfile

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # papermill's finally writes the partial notebook; it is printed below

    signal.signal(signal.SIGTERM, stop)
    try:
        notebook = _read_notebook(os.environ)
        parameters = json.loads(os.environ.get("MLOPS_STEP_PARAMETERS") or "{}")
    except (KeyError, ValueError, zlib.error) as e:
        _emit([PREFIX + b"error " + _one_line(f"the step's notebook did not arrive whole ({e}); the Job is not "
                                              "one jupyter_mlops made").encode()])
        return 2
    work = Path(tempfile.mkdtemp(prefix="mlops-step-"))
    name = Path(os.environ.get("MLOPS_STEP_NOTEBOOK_NAME") or "step.ipynb").name
    src, out, spool = work / name, work / "output" / name, work / ".mlops" / "spool"
    src.write_bytes(notebook)
    out.parent.mkdir()
    # Tracking in the kernel records into this pod's spool; the runner uploads it (the step's run is
    # in the runner's spool, where MLOPS_ATTACH_SPOOL_ID resolves), so no uploader runs here.
    (work / "jupyter_mlops_config.json").write_text(json.dumps({"MlopsConfig": {"flusher_autostart": False}}))
    os.environ.update({"MLOPS_PROJECT_ROOT": str(work), "MLOPS_SPOOL_DIR": str(spool),
                       "MLOPS_OUTPUT_NOTEBOOK_PATH": str(out)})
    os.environ.setdefault("MLOPS_NOTEBOOK_PATH", str(src))
    code, error = _execute(src, out, parameters, os.environ.get("MLOPS_STEP_KERNEL") or "python3")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # what is left is to print the results: a second SIGTERM waits
    lines: list[bytes] = []
    if out.is_file():
        lines += _payload_lines("notebook", out.read_bytes())
    runs = _spool_tar(spool)
    if runs is not None and len(runs) > MAX_SPOOL:
        lines.append(PREFIX + f"warning the runs tracked in the pod ({len(runs) // 2**20} MiB) are too large to come "
                     "back through the log; log large artifacts to an artifact store instead".encode())
    elif runs is not None:
        lines += _payload_lines("spool", runs)
    if error:
        lines.append(PREFIX + b"error " + _one_line(error).encode())
    _emit(lines)
    return code


if __name__ == "__main__":
    sys.exit(main())
