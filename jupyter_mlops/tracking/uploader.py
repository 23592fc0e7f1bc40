"""Uploads spooled runs to MLflow, exactly once in effect. Runs in the flusher or `sync`.

Per run: create the MLflow run (idempotently, found again by its ``mlops.spool_id`` tag), then
send records from the uploaded offset in ``log_batch`` calls within MLflow's limits, advancing the
offset in ``state.json`` only after the server accepted them. Re-sent points after a crash carry
the same key, timestamp, step and value, which MLflow's store keeps once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection

from ..errors import SpoolError
from .client import MlflowGateway, Rejected, Retryable
from .spool import (
    DONE_DIR,
    EVENTS,
    FILES,
    HEADER,
    REJECTED,
    STATE,
    Record,
    RunLock,
    atomic_write_json,
    iter_run_dirs,
    read_json,
    read_records,
    writer_alive,
)

__all__ = ["Uploader", "PassResult"]

log = logging.getLogger("jupyter_mlops.flusher")

BATCHED = frozenset("mpt")  # metrics, params, tags: sent together in log_batch calls
MAX_METRICS = 1000
MAX_PARAMS_TAGS = 100
MAX_REQUEST_BYTES = 900_000  # MLflow refuses log_batch requests over 1e6 bytes
DONE_KEEP_SECONDS = 30 * 24 * 3600  # summaries of uploaded runs (run ids for `runs --all`)


@dataclass
class PassResult:
    runs: int = 0  # run folders seen
    live: int = 0  # with a live writer
    uploaded: int = 0  # records uploaded in this pass
    finished: list[str] = field(default_factory=list)  # spool ids completed in this pass
    waiting: list[str] = field(default_factory=list)  # errors that will be retried
    failed: list[str] = field(default_factory=list)  # runs the server refused to create
    seen: set[str] = field(default_factory=set)  # names of the run folders looked at

    @property
    def pending(self) -> int:
        return self.runs - len(self.finished)


@dataclass
class _Batch:
    metrics: list[tuple[str, float, int, int]] = field(default_factory=list)
    params: list[tuple[str, str]] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    records: list[Record] = field(default_factory=list)
    size: int = 0  # estimated request bytes

    def full(self, record: Record) -> bool:
        if len(self.records) >= MAX_METRICS:  # also bounds metrics + params + tags together
            return True
        if record.kind == "m":
            return False  # a metric adds < 300 bytes: 1000 of them stay far below the size limit
        return (
            len(self.params) >= MAX_PARAMS_TAGS
            or len(self.tags) >= MAX_PARAMS_TAGS
            or self.size + sum(map(len, record.fields)) > MAX_REQUEST_BYTES
        )

    def add(self, record: Record) -> None:
        f = record.fields
        if record.kind == "m":
            self.metrics.append((f[0], float(f[1]), int(f[2]), int(f[3])))
            self.size += 300
        else:
            value = json.loads(f[1])
            if record.kind == "p":
                self.params.append((f[0], value))
            else:
                self.tags[f[0]] = value
            self.size += len(f[0]) + len(value) + 32
        self.records.append(record)


class Uploader:
    def __init__(self, spool_dir: Path, *, retry_refused: bool = False, give_up: Collection[str] = (),
                 on_progress: Callable[[str, int, int, int], None] | None = None) -> None:
        """``retry_refused``: try again runs the server refused (``jupyter mlops sync`` does, after
        the user fixed the cause); the background flusher leaves them alone. ``give_up``: spool
        ids of refused runs whose records are to be set aside instead (the user gave them up).
        ``on_progress(spool_id, records, bytes_done, bytes_total)``: called after each request that
        moved a run on (records: uploaded in this pass), for a progress display."""
        self.spool_dir = spool_dir
        self.retry_refused = retry_refused
        self.give_up = frozenset(give_up)
        self.on_progress = on_progress
        self._gateways: dict[tuple[str, str | None], MlflowGateway] = {}
        self._reported: dict[str, str] = {}

    def gateway(self, header: dict[str, Any]) -> MlflowGateway:
        key = (header["tracking_uri"], header.get("artifact_root"))
        if key not in self._gateways:
            try:
                self._gateways[key] = MlflowGateway(*key)
            except Exception as e:  # an unusable URI: MLflow refuses it when the client is made
                from .client import _classify

                raise _classify(key[0], e) from e
        return self._gateways[key]

    def pass_once(self, *, wait_for_lock: bool = False, windows: int | None = 1) -> PassResult:
        """Upload what is pending in every run folder, at most ``windows`` reads (about 4 MiB each)
        per run, so one long run does not hold up the others (None: everything).

        Never raises for a server problem; raises :class:`SpoolError` when the spool cannot be
        written (the uploader could not record its progress).
        """
        result = PassResult()
        for run_dir in iter_run_dirs(self.spool_dir):
            result.runs += 1
            result.seen.add(run_dir.name)
            lock = RunLock(run_dir)
            try:
                if not lock.acquire(blocking=wait_for_lock):
                    result.live += 1  # another uploader is on it
                    continue
            except FileNotFoundError:
                result.runs -= 1  # finished and removed by another uploader meanwhile
                continue
            except OSError as e:
                raise SpoolError(str(self.spool_dir), e.strerror or str(e)) from e
            try:
                self._upload_run(run_dir, result, windows)
            except Retryable as e:
                result.waiting.append(f"{run_dir.name}: {e}")
                self._report(run_dir.name, f"will retry: {e}")
                _set_waiting(run_dir, str(e))
            except Rejected as e:
                result.failed.append(f"{run_dir.name}: {e.reason}")
                self._report(run_dir.name, f"refused: {e}")
            except Exception as e:  # a bug of ours must not stop the other runs' uploads
                if self._reported.get(run_dir.name) != repr(e):
                    log.exception("%s: unexpected error; the run stays spooled", run_dir.name)
                    self._reported[run_dir.name] = repr(e)
                result.waiting.append(f"{run_dir.name}: unexpected error {type(e).__name__}: {e}")
            finally:
                lock.release()
        return result

    def _report(self, spool_id: str, message: str) -> None:
        if self._reported.get(spool_id) != message:  # say it once, not on every retry
            self._reported[spool_id] = message
            log.warning("%s: %s", spool_id, message)

    # -- one run ----------------------------------------------------------------------------------

    def _upload_run(self, run_dir: Path, result: PassResult, windows: int | None) -> None:
        header = read_json(run_dir / HEADER)
        if header is None:
            return
        state = read_json(run_dir / STATE) or {"offset": 0}
        state.pop("waiting", None)  # written back with the first progress of this pass
        state.pop("waiting_since", None)
        if run_dir.name in self.give_up:
            state["give_up"] = True
        if state.get("failed"):
            if not self.retry_refused and not state.get("give_up"):
                result.failed.append(f"{run_dir.name}: {state['failed']}")
                return
            del state["failed"]
        alive = writer_alive(run_dir)  # before reading: a dead writer adds no more records
        if alive:
            result.live += 1
        gateway = self.gateway(header)
        if not state.get("run_id"):
            try:
                self._create_run(gateway, header, state, run_dir)
            except Rejected as e:
                state["failed"] = e.reason
                atomic_write_json(run_dir / STATE, state)
                raise
        run_id = state["run_id"]
        reads = 0
        sent = 0
        while windows is None or reads < windows:
            records = read_records(run_dir, int(state["offset"]))
            reads += 1
            if not records:
                break
            i = 0
            while i < len(records):
                if records[i].kind in BATCHED:
                    batch = _Batch()
                    while i < len(records) and records[i].kind in BATCHED and not batch.full(records[i]):
                        try:
                            batch.add(records[i])
                        except (ValueError, IndexError, TypeError):  # a damaged line: set aside, go on
                            self._reject(gateway, run_id, run_dir, records[i], "malformed record", state)
                        i += 1
                    if batch.records:
                        self._send_batch(gateway, run_id, batch, run_dir, state)
                        result.uploaded += len(batch.records)
                        sent += len(batch.records)
                    state["offset"] = records[i - 1].end
                else:
                    self._apply(gateway, run_id, run_dir, records[i], state)
                    result.uploaded += 1
                    sent += 1
                    state["offset"] = records[i].end
                    i += 1
                atomic_write_json(run_dir / STATE, state)
                if self.on_progress is not None:
                    self.on_progress(run_dir.name, sent, int(state["offset"]), _size(run_dir))
        ended = state.get("ended")
        if not alive and not _fully_read(run_dir, int(state["offset"])) and not read_records(run_dir, int(state["offset"]), 1 << 20):
            # A dead writer's last record was cut short (the disk filled, the process was killed
            # inside a write): no newline will ever come. Set the tail aside and finish the run.
            size = os.stat(run_dir / EVENTS).st_size
            tail = Record("?", ("<unterminated tail>",), size)
            self._reject(gateway, run_id, run_dir, tail, f"unterminated last record ({size - int(state['offset'])} bytes)", state)
            state["offset"] = size
            atomic_write_json(run_dir / STATE, state)
        if not alive and not ended and _fully_read(run_dir, int(state["offset"])):
            # The kernel died without ending the run (killed, crashed, out of memory). An attached
            # run's target belongs to its owner (a pipeline step's runner), which ends it.
            if not state.get("attached"):
                end = Record("e", ("KILLED", str(int(time.time() * 1000))), -1)  # -1: no offset of the file
                try:
                    gateway.set_tags(run_id, {"mlops.end_reason": "the writing process died before the run ended"})
                    gateway.terminate(run_id, "KILLED", int(end.fields[1]))
                except Rejected as e:
                    self._check_run(gateway, run_id, run_dir, state)
                    state["end_refused"] = e.reason
                    self._reject(gateway, run_id, run_dir, end, e.reason, state)
            ended = state["ended"] = "KILLED"
            atomic_write_json(run_dir / STATE, state)
        if ended and not alive and _fully_read(run_dir, int(state["offset"])):
            self._finish(run_dir, header, state)
            result.finished.append(run_dir.name)

    def _apply(self, gateway: MlflowGateway, run_id: str, run_dir: Path, record: Record, state: dict[str, Any]) -> None:
        """One artifact, dataset or end record; a record that cannot be applied is set aside."""
        try:
            if record.kind == "a":
                spec = json.loads(record.fields[0])
                files = (run_dir / FILES).resolve()
                src = (files / spec["src"]).resolve()
                if not src.is_relative_to(files):  # a crafted spool must not upload other files
                    raise ValueError(f"artifact {spec['src']!r} is outside the run's spooled files")
                if not src.exists():
                    raise ValueError(f"artifact snapshot {spec['src']} is missing from the spool")
                gateway.log_artifact(run_id, src, spec.get("path"))
            elif record.kind == "d":
                gateway.log_dataset(run_id, record.fields[0], json.loads(record.fields[1]))
            elif record.kind == "e":
                status, end_time = record.fields[0], int(record.fields[1])
                state["ended"] = status  # also when refused: a refused end is set aside, never re-sent
                if not state.get("attached"):
                    gateway.terminate(run_id, status, end_time)  # an attached run's owner ends it
            else:
                raise ValueError("malformed record")
        except Rejected as e:
            self._check_run(gateway, run_id, run_dir, state)
            if record.kind == "e":
                state["end_refused"] = e.reason
            self._reject(gateway, run_id, run_dir, record, e.reason, state)
        except (ValueError, IndexError, KeyError, TypeError) as e:
            self._reject(gateway, run_id, run_dir, record, str(e) if record.kind != "?" else "malformed record", state)

    def _create_run(self, gateway: MlflowGateway, header: dict[str, Any], state: dict[str, Any], run_dir: Path) -> None:
        target = header.get("run_id") or self._spooled_run_id(header.get("attach_spool_id"), gateway)
        if target:  # attach to a run someone else created (a pipeline step's)
            state["run_id"] = target
            state["attached"] = bool(header.get("attach_spool_id"))
            gateway.set_tags(target, {k: v for k, v in header["tags"].items()
                                      if k not in ("mlflow.parentRunId", "mlops.spool_id")})
            state["experiment_id"] = None
        else:
            parent = self._spooled_run_id(header.get("parent_spool_id"), gateway)
            if parent:
                header["tags"]["mlflow.parentRunId"] = parent
            exp_id = gateway.experiment_id(header["experiment"])
            # A run created by an uploader that died before noting it (or a lost state.json) is
            # found again by its spool id instead of being created twice.
            run_id = gateway.find_run(exp_id, header["spool_id"])
            if run_id is None:
                run_id = gateway.create_run(exp_id, header["start_time"], header["tags"], header.get("run_name"))
            state["run_id"] = run_id
            state["experiment_id"] = exp_id
        state["url"] = gateway.run_url(state.get("experiment_id") or "0", state["run_id"])
        atomic_write_json(run_dir / STATE, state)
        log.info("%s: recording into run %s at %s", header["spool_id"], state["run_id"], gateway.uri)

    def _spooled_run_id(self, spool_id: str | None, gateway: MlflowGateway) -> str | None:
        """The MLflow run id of another run in this spool (uploaded or not yet finished)."""
        if not spool_id:
            return None
        for path in (self.spool_dir / spool_id / STATE, self.spool_dir / DONE_DIR / f"{spool_id}.json"):
            found = read_json(path)
            if found and found.get("run_id"):
                return str(found["run_id"])
        raise Retryable(gateway.uri, f"waiting for run {spool_id} to be created first")

    def _send_batch(self, gateway: MlflowGateway, run_id: str, batch: _Batch, run_dir: Path, state: dict[str, Any]) -> None:
        try:
            gateway.log_batch(run_id, batch.metrics, batch.params, list(batch.tags.items()))
        except Rejected:
            self._check_run(gateway, run_id, run_dir, state)
            # Narrow down: send record by record, set aside only what the server refuses.
            for record in batch.records:
                single = _Batch()
                single.add(record)
                try:
                    gateway.log_batch(run_id, single.metrics, single.params, list(single.tags.items()))
                except Rejected as e:
                    self._reject(gateway, run_id, run_dir, record, e.reason, state)

    def _reject(self, gateway: MlflowGateway, run_id: str, run_dir: Path, record: Record, reason: str,
                state: dict[str, Any]) -> None:
        """Set a record aside in rejected.log (once, also when a pass is replayed) and count it."""
        done = state.setdefault("rejected_at", [])  # offsets already set aside (rejections are rare)
        if record.end in done:
            return
        line = json.dumps({"record": [record.kind, *record.fields], "reason": reason, "offset": record.end})
        with open(run_dir / REJECTED, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        done.append(record.end)
        state["rejected"] = len(done)
        state["refusal"] = reason  # the latest: what status and flush tell the user
        log.warning("%s: set aside %s record %s (see %s): %s", run_dir.name, record.kind, record.fields[:1], REJECTED, reason)
        try:
            gateway.set_tags(run_id, {"mlops.rejected_records": str(state["rejected"])})
        except Rejected:
            pass

    def _check_run(self, gateway: MlflowGateway, run_id: str, run_dir: Path, state: dict[str, Any]) -> None:
        """After a refusal: when the run itself takes nothing (deleted with its experiment, gone),
        setting every record aside would lose the run for a cause the user can undo. Keep it
        whole instead, as REFUSED with what to do (the flusher leaves it; ``sync`` retries it),
        unless the user gave its records up."""
        if state.get("give_up"):
            return
        why = gateway.run_refusal(run_id)
        if why is None:
            return
        state["failed"] = (f"{why}, then run `jupyter mlops sync`; or give up its unsent records: "
                           f"jupyter mlops sync --give-up {run_dir.name}")
        atomic_write_json(run_dir / STATE, state)
        raise Rejected(gateway.uri, state["failed"])

    def _finish(self, run_dir: Path, header: dict[str, Any], state: dict[str, Any]) -> None:
        done_dir = self.spool_dir / DONE_DIR
        done_dir.mkdir(exist_ok=True)
        summary = dict(state)
        summary.update({k: header.get(k) for k in ("spool_id", "experiment", "run_name", "tracking_uri", "notebook", "invocation")})
        rejected = run_dir / REJECTED
        if rejected.exists():
            shutil.copy2(rejected, done_dir / f"{run_dir.name}.rejected.log")
            summary["rejected_log"] = str(done_dir / f"{run_dir.name}.rejected.log")
        atomic_write_json(done_dir / f"{run_dir.name}.json", summary)
        shutil.rmtree(run_dir, ignore_errors=True)
        _prune(done_dir, DONE_KEEP_SECONDS)
        log.info("%s: run %s complete (%s)", run_dir.name, state["run_id"], state.get("ended"))


def _prune(folder: Path, older_than: float) -> None:
    cutoff = time.time() - older_than
    for path in folder.iterdir():
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def _set_waiting(run_dir: Path, reason: str) -> None:
    """Note in the run's state why it is not uploading (readers show it; the next success clears it)."""
    state = read_json(run_dir / STATE) or {"offset": 0}
    state["waiting"] = reason
    state["waiting_since"] = state.get("waiting_since") or time.time()
    atomic_write_json(run_dir / STATE, state)


def _size(run_dir: Path) -> int:
    try:
        return os.stat(run_dir / EVENTS).st_size
    except FileNotFoundError:
        return 0


def _fully_read(run_dir: Path, offset: int) -> bool:
    try:
        return os.stat(run_dir / EVENTS).st_size <= offset
    except FileNotFoundError:
        return True
