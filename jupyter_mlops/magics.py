"""``%mlops``: a thin face over :mod:`jupyter_mlops.tracking`.

Every failure a user can cause shows as one line (IPython's UsageError), never a traceback.
"""

from __future__ import annotations

import argparse
import shlex
import string
import sys
import time
from types import CodeType, FrameType
from typing import Any

from IPython.core.error import UsageError

from . import tracking
from .errors import MlopsError

__all__ = ["register", "unregister", "mlops_magic"]

_shell: Any = None


class _Exit(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message} (see %mlops --help)")

    def exit(self, status: int = 0, message: str | None = None) -> None:  # type: ignore[override]
        if message:
            print(message)
        raise _Exit()


def _build_parser() -> _Parser:
    parser = _Parser(prog="%mlops", description="Track this notebook's runs in MLflow.", add_help=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("track", help="start a tracked run (records notebook, git, environment)")
    p.add_argument("--experiment", "-e", help="experiment name (default from config: the project)")
    p.add_argument("--name", "-n", help="run name (default: the notebook's name)")
    p.add_argument("--autolog", action="store_true", help="also turn on mlflow.autolog() (imports mlflow in the kernel: ~2 s)")
    p = sub.add_parser("log", help="log metrics: %%mlops log loss=0.3 acc=0.9 [--step N]")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    p.add_argument("--step", type=int, default=None)
    p = sub.add_parser("params", help="log params: %%mlops params lr=0.01 model=rf")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    p = sub.add_parser("tag", help="set tags: %%mlops tag stage=baseline")
    p.add_argument("pairs", nargs="+", metavar="KEY=VALUE")
    p = sub.add_parser("artifact", help="log a file or folder as an artifact (copied now)")
    p.add_argument("path")
    p.add_argument("--path", dest="artifact_path", metavar="DIR", help="folder inside the run's artifacts")
    sub.add_parser("status", help="the active run: id, experiment, where to see it")
    p = sub.add_parser("end", help="end the run (logs the notebook)")
    p.add_argument("--status", choices=["FINISHED", "FAILED", "KILLED"], type=str.upper,
                   help="default FINISHED: a run you end was not failed by an earlier cell")
    p = sub.add_parser("flush", help="wait until everything logged is on the tracking server")
    p.add_argument("--timeout", type=float, default=30.0)
    data = sub.add_parser("data", help="versioned data (DVC): add, use, status, push, pull")
    dsub = data.add_subparsers(dest="data_command", metavar="ACTION", parser_class=_Parser)
    p = dsub.add_parser("add", help="version files or folders; recorded as the run's outputs")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p = dsub.add_parser("use", help="record PATH[@REV] as the run's input; returns a path to read")
    p.add_argument("path", metavar="PATH[@REV]")
    dsub.add_parser("status", help="what changed since the versions this run recorded")
    p = dsub.add_parser("push", help="upload versioned data to the DVC remote")
    p.add_argument("paths", nargs="*", metavar="PATH")
    p = dsub.add_parser("pull", help="fetch versioned data from the DVC remote")
    p.add_argument("paths", nargs="*", metavar="PATH")
    return parser


def _pairs(pairs: list[str], what: str) -> dict[str, str]:
    values = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"%mlops {what}: expected KEY=VALUE, got {pair!r}")
        values[key] = value
    return values


def mlops_magic(line: str) -> Any:
    """Track this notebook in MLflow. Run ``%mlops --help`` for the commands."""
    if "{" in line or "$" in line:
        line = _expand(line)
    try:
        if line.startswith("log "):
            pairs = _fast_log_line(line)
            if pairs is not None:  # the common form, in a training loop: no argparse
                return _log_pairs(*pairs)
        return _dispatch(line)
    except UsageError as e:
        e._mlops_own = True  # type: ignore[attr-defined]  # not the user's code failing: see _post_run_cell
        raise


mlops_magic._ipython_magic_no_var_expand = True  # type: ignore[attr-defined]  # see _expand

_FORMATTER = string.Formatter()
_COMPILED: dict[str, CodeType] = {}


def _expand(line: str) -> str:
    """``{expression}`` in the line, as IPython's own expansion does it (the user's namespace,
    then the calling frame's locals; left as is when an expression fails) but without its cost:
    IPython copies the user's namespace, which grows with every cell, and compiles each
    expression on every call (most of a ``%mlops log x={x}`` line's time in a loop). ``$name``
    lines go to IPython's expansion itself."""
    frame = _user_frame()
    if frame is None or _shell is None:
        return line
    if "$" in line:
        namespace = dict(_shell.user_ns)
        namespace.update(frame.f_locals)
        try:
            return _dollar_formatter().vformat(line, args=[], kwargs=namespace)
        except Exception:
            return line
    try:
        out = []
        for literal, field, spec, conversion in _FORMATTER.parse(line):
            out.append(literal)
            if field is None:
                continue
            if spec:  # IPython reads {a[1:2]} as a slice, not a format spec
                field = f"{field}:{spec}"
            code = _COMPILED.get(field)
            if code is None:
                if len(_COMPILED) > 1000:  # a loop repeats a few expressions; bound the rest
                    _COMPILED.clear()
                code = _COMPILED[field] = compile(field, "<%mlops>", "eval")
            value = eval(code, _shell.user_ns, frame.f_locals)
            out.append(str(_FORMATTER.convert_field(value, conversion) if conversion else value))
        return "".join(out)
    except Exception:  # as IPython: an expression that fails leaves the line untransformed
        return line


def _user_frame() -> FrameType | None:
    """The frame whose code ran ``%mlops`` (the one IPython would expand in), or None when the
    magic was called directly, not through the shell's ``run_line_magic``."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None:
            return None
        if frame.f_code.co_name == "run_line_magic":
            caller = frame.f_back  # the user's code; through the old magic() one frame further
            if caller is not None and caller.f_code.co_name == "magic":  # (not f_locals: it costs)
                caller = caller.f_back
            return caller
        frame = frame.f_back
    return None


def _dollar_formatter() -> Any:
    from IPython.core.interactiveshell import _dollar_formatter as formatter  # type: ignore[attr-defined]

    return formatter


def _dispatch(line: str) -> Any:
    parser = _parser()
    try:
        args = parser.parse_args(shlex.split(line))
    except ValueError as e:  # unbalanced quotes
        raise UsageError(f"%mlops: {e}") from None
    except _Exit:
        return
    if args.command is None:
        parser.print_help()
        return
    try:
        return _COMMANDS[args.command](args)
    except MlopsError as e:
        raise UsageError(str(e)) from None


_PARSER: _Parser | None = None


def _parser() -> _Parser:
    """Built once: building it costs milliseconds, a training loop calls the magic thousands of times."""
    global _PARSER
    if _PARSER is None:
        _PARSER = _build_parser()
    return _PARSER


def _fast_log_line(line: str) -> tuple[list[tuple[str, str]], int | None] | None:
    """``log k=v ... [--step N]`` split by hand: (pairs, step), or None for anything else (quotes,
    other options, a bad pair or step, no pair), which argparse then parses, so its errors and
    help stay the same. Same tokens as ``shlex.split`` for what it accepts (ASCII, no quotes)."""
    if not line.isascii() or "'" in line or '"' in line or "\\" in line:
        return None
    tokens = line.split()
    pairs = []
    step = None
    i, n = 1, len(tokens)
    while i < n:
        token = tokens[i]
        if token == "--step" and i + 1 < n:
            try:
                step = int(tokens[i + 1])
            except ValueError:
                return None
            i += 2
            continue
        key, sep, value = token.partition("=")
        if not sep or not key or token[0] == "-":
            return None
        pairs.append((key, value))
        i += 1
    return (pairs, step) if pairs else None


def _number(key: str, text: str) -> float:
    """A metric value written in the magic's text, as MLflow's client reads one (``float()``:
    '1e3' is 1000.0, 'nan' and 'inf' are NaN and infinity, which MLflow stores)."""
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"metric {key!r}: needs a number, got {text!r}") from None


def _track(args: argparse.Namespace) -> None:
    previous = tracking.active_run()
    if previous is not None:
        previous.end()
        print(f"Ended the previous run ({previous.run_id or previous.spool_id}).")
    history = list(getattr(_shell, "user_ns", {}).get("In", []) or [])
    run = tracking.start_run(
        experiment=args.experiment,
        name=args.name,
        history=history,
        user_ns=getattr(_shell, "user_ns", None),
    )
    where = run.header.get("notebook") or "this kernel"
    print(f"Tracking {where} in experiment {run.header['experiment']!r} ({run.header['tracking_uri']}).")
    if args.autolog:
        from .tracking.autolog import enable

        enable(run)
        print("mlflow.autolog() is on for this run.")


def _log(args: argparse.Namespace) -> None:
    _log_pairs(list(_pairs(args.pairs, "log").items()), args.step)


def _log_pairs(pairs: list[tuple[str, str]], step: int | None) -> None:
    """Every value is read before any is logged: a bad one in a line records none of the line."""
    run = _run("log metrics")
    values = [(key, _number(key, text)) for key, text in pairs]
    timestamp = time.time_ns() // 1_000_000  # one line, one moment (as log_metrics)
    try:
        for key, value in values:
            run.log_metric(key, value, step, timestamp)
    except MlopsError as e:
        raise UsageError(str(e)) from None


def _params(args: argparse.Namespace) -> None:
    _run("log params").log_params(_pairs(args.pairs, "params"))


def _tag(args: argparse.Namespace) -> None:
    _run("set tags").set_tags(_pairs(args.pairs, "tag"))


def _artifact(args: argparse.Namespace) -> None:
    _run("log an artifact").log_artifact(args.path, args.artifact_path)


def _status(args: argparse.Namespace) -> None:
    run = tracking.last_run()
    if run is None:
        print("No run. Start one with %mlops track.")
        return
    state = run.upload_state() or {}
    lines = [
        ("run", run.run_id or f"(being created; local id {run.spool_id})"),
        ("status", run.status),
        ("experiment", f"{run.header['experiment']}" + (f" (id {state['experiment_id']})" if state.get("experiment_id") else "")),
        ("tracking", run.header["tracking_uri"]),
    ]
    if state.get("url"):
        lines.append(("see it", state["url"]))
    elif not run.header["tracking_uri"].startswith(("http://", "https://")):
        lines.append(("see it", "jupyter mlops ui   (then open http://127.0.0.1:5000)"))
    pending = run.pending_bytes()
    lines.append(("upload", f"{pending} bytes waiting" if pending else "up to date"))
    if state.get("waiting"):
        lines.append(("retrying", state["waiting"]))
    note = run.refusal()
    if note:
        lines.append(("refused", note))
    for key, value in lines:
        print(f"{key + ':':<12}{value}")


def _end(args: argparse.Namespace) -> None:
    run = _run("end the run")
    status = run.end(args.status or "FINISHED")  # asked to end: an earlier failed cell was dealt with
    print(f"Run {run.run_id or run.spool_id} ended: {status}.")


def _flush(args: argparse.Namespace) -> None:
    run = tracking.last_run()
    if run is None:
        print("No run.")
        return
    uploaded = run.wait(args.timeout)
    note = run.refusal()
    if note:
        print(f"Run {run.run_id or run.spool_id}: {note}.")
    elif uploaded:
        print(f"Run {run.run_id} is up to date on {run.header['tracking_uri']}.")
    else:
        print(f"Still {run.pending_bytes()} bytes waiting after {args.timeout:g}s; they stay spooled "
              "and upload when the server answers (or run `jupyter mlops sync`).")


def _data(args: argparse.Namespace) -> Any:
    from . import data

    action = args.data_command
    if action is None:
        raise UsageError("%mlops data: name an action: add, use, status, push or pull")
    if action == "add":
        for v in data.add(*args.paths):
            print(f"Versioned {v.path}: md5 {v.digest[:12]}, {_size(v.size)}"
                  + (f", {v.nfiles} files" if v.kind == "dir" else "")
                  + ("" if v.rev else f" (commit {v.path}.dvc with git to share this version)"))
        return None
    if action == "use":
        path, _, rev = args.path.partition("@")
        local = data.use(path, rev or None)
        print(f"Using {path}" + (f" at {rev}" if rev else "") + f" -> {local}")
        return str(local)
    if action == "status":
        changes = data.status()
        if not changes:
            print("This run has recorded no data.")
        for c in changes:
            print(f"{c.state:<10}{c.role:<8}{c.recorded.path}  (recorded {c.recorded.digest[:12]}"
                  + (f", now {c.current_md5.removesuffix('.dir')[:12]}" if c.state == "changed" and c.current_md5 else "")
                  + (f", at git {c.recorded.rev[:10]}" if c.state == "pinned" and c.recorded.rev else "")
                  + ")")
        return None
    if action == "push":
        print(f"Pushed {data.push(*args.paths)} file(s) to the DVC remote.")
        return None
    stats = data.pull(*args.paths)
    print(f"Pulled: {len(stats.get('fetched', []) or [])} fetched, {len(stats.get('added', []) or [])} added.")
    return None


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _run(action: str) -> tracking.Run:
    run = tracking.active_run()
    if run is None:
        raise UsageError(f"cannot {action}: no run is active; start one with %mlops track")
    return run


_COMMANDS = {
    "track": _track,
    "log": _log,
    "params": _params,
    "tag": _tag,
    "artifact": _artifact,
    "status": _status,
    "end": _end,
    "flush": _flush,
    "data": _data,
}


def _post_run_cell(result: Any) -> None:
    if _transcript is not None:
        _transcript.cell_ran(result.execution_count)
    run = tracking.active_run()
    if run is None:
        return
    error = result.error_in_exec or result.error_before_exec
    if getattr(error, "_mlops_own", False):
        error = None  # a %mlops usage error (e.g. a changed param) is no failure of the user's code
    run.note_cell(f"{type(error).__name__}: {error}" if error is not None else None)


_transcript: Any = None  # jupyter_mlops._transcript.Transcript of this kernel


def register(shell: Any) -> None:
    global _shell, _transcript
    _shell = shell
    if _transcript is None or _transcript.shell is not shell:
        from ._transcript import Transcript
        from .tracking.run import set_executed_notebook

        if _transcript is not None:
            _transcript.uninstall()
        _transcript = Transcript(shell)
        _transcript.install()
        set_executed_notebook(_transcript.notebook)
    shell.register_magic_function(mlops_magic, "line", "mlops")
    if _post_run_cell not in shell.events.callbacks["post_run_cell"]:
        shell.events.register("post_run_cell", _post_run_cell)


def unregister(shell: Any) -> None:
    global _transcript
    if _transcript is not None and _transcript.shell is shell:
        from .tracking.run import set_executed_notebook

        _transcript.uninstall()
        set_executed_notebook(None)
        _transcript = None
    shell.magics_manager.magics["line"].pop("mlops", None)
    if _post_run_cell in shell.events.callbacks["post_run_cell"]:
        shell.events.unregister("post_run_cell", _post_run_cell)
