"""Pipelines benchmark: what running notebooks as a `pipeline.yaml` costs next to papermill and DVC.

    python bench/pipelines.py [--quick]

Measures, each against what a user would do without us (the anchor), interleaved, medians:

1. the iris pipeline (``examples/iris``) end to end, nothing cached: ``python -m jupyter_mlops
   pipeline run pipeline.yaml --no-progress`` vs its four notebook runs by the ``papermill`` CLI
   in sequence, as a user would script them (each a subprocess, start-up included);
2. a no-op re-run (every step cached): the same ``pipeline run`` again in the copy of 1 vs
   ``dvc repro`` of the same DAG written as ``dvc.yaml`` (stages running papermill), nothing
   changed; neither may rewrite an output;
3. the overhead per step on a pooled kernel: a generated chain of N steps (8; 4 with ``--quick``)
   linked by ``needs``, each a trivial 3-cell notebook, run in-process with ``force=True`` by
   ``jupyter_mlops.pipelines.runner.run_pipeline``: (wall time - the cells' own time, ~0) / N, vs
   one ``papermill.execute_notebook`` of the same notebook in-process (a cold kernel each time,
   as papermill does);
4. loading a pipeline of a 10,000-step matrix and building its DAG (``load_pipeline`` +
   ``build_dag``, in-process): ours alone, no anchor (it was 31.6 s when every step's outputs were
   compared with every step's inputs); the figure is ``dag_build_10k_s``.

Every measure works in a fresh copy of ``examples/iris`` (or of the chain) in one temporary
folder: its own git repository and DVC project (``dvc init``), with the embedded MLflow store's
schema already made (neither contender pays the migration). DVC's site cache and config folders
point into that folder too and its analytics are off. Nothing touches the repository; all of it
is removed at the end. If the runner is not there yet the anchors still run and ours is null.
The last line of stdout is one JSON object (see bench/README.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

warnings.filterwarnings("ignore")

from _common import Logger, fmt, goal_met, interleave, median, quick_mode, scratch, stdout_to_stderr, ratio  # noqa: E402

log = Logger("pipelines")

GOALS = {
    "vs_papermill_cli": ">=2",
    "step_overhead_s": "<=0.15",
    "noop_rerun_s": "<=0.2",
}

REPO = Path(__file__).resolve().parent.parent
IRIS = REPO / "examples" / "iris"
TRIVIAL = "step.ipynb"


class RunnerMissing(Exception):
    """The pipeline runner (``jupyter_mlops.pipelines.runner`` and ``pipeline run``) is not there."""


# -- small helpers ----------------------------------------------------------------------------------


def tool(name: str) -> str:
    """The virtual environment's entry point for ``name`` (what a user of it runs)."""
    script = Path(sys.executable).with_name(name)
    return str(script) if script.exists() else (shutil.which(name) or name)


def run(cmd: list[str], cwd: Path, expect: str | None = None) -> float:
    """One command as a user runs it; seconds from launch to exit. Raises with its output if it fails."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    dt = time.perf_counter() - t0
    if done.returncode != 0 or (expect is not None and expect not in done.stdout + done.stderr):
        shown = " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))
        raise RuntimeError(f"{shown} (in {cwd}) -> {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return dt


def settle(root: Path, timeout: float = 60.0) -> None:
    """Wait until every run spooled in ``root`` is uploaded, so the next measure does not share the
    CPU with this one's background upload (the flusher itself may linger idle a few seconds)."""
    from jupyter_mlops.tracking.spool import iter_run_dirs

    spool = root / ".mlops" / "spool"
    deadline = time.monotonic() + timeout
    while any(True for _ in iter_run_dirs(spool)):
        if time.monotonic() > deadline:
            log(f"  warning: runs still spooled in {spool} after {timeout:.0f} s")
            return
        time.sleep(0.05)


def stop_flushers(tmp: Path, wait: float = 10.0) -> None:
    """The flushers the notebooks started exit a few seconds after their last upload; wait for
    them, then stop any left (by the pid in its lock file) before the folder goes."""
    from jupyter_mlops.tracking.flusher import running_pid

    spools = [p.parent for p in tmp.glob("**/.mlops/spool/flusher.lock")]
    deadline = time.monotonic() + wait
    while (live := [s for s in spools if (running_pid(s) or 0) > 0]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for spool in live:
        pid = running_pid(spool)
        if pid and pid > 0:
            log(f"stopping the flusher {pid} of {spool}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def output_state(root: Path, outputs: list[str]) -> dict[str, tuple[int, int]]:
    """(mtime_ns, size) of each output: a step that ran again rewrites its outputs."""
    state = {}
    for rel in outputs:
        st = (root / rel).stat()
        state[rel] = (st.st_mtime_ns, st.st_size)
    return state


# -- the projects ----------------------------------------------------------------------------------


def start_store(tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """Make the embedded MLflow store's schema once (seconds: MLflow's import and migrations), in
    the background while the projects are made; each project gets a copy of the file."""
    folder = tmp / "mlflow-store"
    folder.mkdir()
    code = ("from jupyter_mlops.config import load_config; import mlflow; "
            "mlflow.MlflowClient(load_config().resolved_tracking_uri).search_experiments()")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=folder, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "MLOPS_PROJECT_ROOT": str(folder)})
    return proc, folder / ".mlops" / "mlflow.db"


def make_project(root: Path) -> None:
    """``root`` (sources already there) becomes a git + DVC project, committed."""
    run(["git", "init", "-q"], root)
    run([tool("dvc"), "init", "-q"], root)  # its own git repository: no --subdir
    (root / ".mlops").mkdir()
    (root / ".mlops" / ".gitignore").write_text("*\n")  # as `jupyter mlops init` writes it
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-q", "-m", "sources"], root)


def iris_template(dest: Path, spec: Any) -> None:
    """The example's sources only (not what a run in place may have left there)."""
    generated = {out.split("/")[0] for step in spec.steps.values() for out in step.outputs}
    ignore = shutil.ignore_patterns(".dvc", ".dvcignore", ".mlops", ".gitignore", "*.dvc", "dvc.lock",
                                    "*.out.ipynb", ".ipynb_checkpoints", *generated)
    shutil.copytree(IRIS, dest, ignore=ignore)
    make_project(dest)


def chain_template(dest: Path, n: int) -> None:
    """A trivial 3-cell notebook and a pipeline of ``n`` steps chained by ``needs``."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    dest.mkdir()
    nb = new_notebook(metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nb.cells = [new_code_cell("a = 0\nb = 1", metadata={"tags": ["parameters"]}),
                new_code_cell("c = a + b"),
                new_code_cell("c")]
    nbformat.write(nb, dest / TRIVIAL)
    lines = ["name: chain", "workers: 1", "steps:"]
    for i in range(n):
        lines += [f"  s{i}:", f"    notebook: {TRIVIAL}", f"    parameters: {{a: {i}}}"]
        if i:
            lines.append(f"    needs: [s{i - 1}]")
    (dest / "pipeline.yaml").write_text("\n".join(lines) + "\n")
    make_project(dest)


def stage_name(step: str) -> str:
    """``train[model=rf]`` -> ``train-model-rf``: a name DVC accepts for a stage (and a file name)."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", step).strip("-")


def papermill_argv(spec: Any, name: str, nb_out: Path) -> list[str]:
    """The papermill command a user writes for one step: its notebook, its resolved parameters."""
    step = spec.steps[name]
    notebook = step.notebook.relative_to(spec.file.parent).as_posix()
    argv = [tool("papermill"), notebook, str(nb_out / f"{stage_name(name)}.out.ipynb")]
    for key, value in step.parameters.items():
        argv += ["-p", key, str(value)]
    return argv


def dvc_yaml(spec: Any, order: list[str], nb_out: Path) -> dict[str, Any]:
    """The same DAG as DVC stages, each running its notebook with the papermill CLI. The executed
    notebooks go outside the project: they are no outs (papermill's timestamps would change them)."""
    stages = {}
    for name in order:
        step = spec.steps[name]
        stage: dict[str, Any] = {"cmd": shlex.join(papermill_argv(spec, name, nb_out)),
                                 "deps": [step.notebook.relative_to(spec.file.parent).as_posix(), *step.inputs]}
        if step.outputs:
            stage["outs"] = list(step.outputs)
        stages[stage_name(name)] = stage
    return {"stages": stages}


# -- the contenders ----------------------------------------------------------------------------------


class Bench:
    def __init__(self, tmp: Path, p: dict[str, Any]) -> None:
        from jupyter_mlops.pipelines.dag import build_dag
        from jupyter_mlops.pipelines.spec import load_pipeline

        self.tmp = tmp
        self.p = p
        self.nb_out = tmp / "notebooks-out"
        self.nb_out.mkdir()
        self.spec = load_pipeline(IRIS / "pipeline.yaml")
        self.order = build_dag(self.spec).order()
        self.outputs = [out for name in self.order for out in self.spec.steps[name].outputs]
        self.copies = 0
        t0 = time.perf_counter()
        store, db = start_store(tmp)
        iris_template(tmp / "iris-template", self.spec)
        chain_template(tmp / "chain-template", p["chain_steps"])
        _, err = store.communicate()
        if store.returncode != 0:
            raise RuntimeError(f"making the MLflow store failed: {err.decode(errors='replace')[-2000:]}")
        for kind in ("iris", "chain"):
            shutil.copyfile(db, tmp / f"{kind}-template" / ".mlops" / "mlflow.db")
        log(f"templates (git init, dvc init, MLflow schema) in {time.perf_counter() - t0:.1f} s")
        self.reference: dict[str, bytes] | None = None  # the papermill run's metrics, for ours to match
        self.run_pipeline: Callable[..., Any] | None = None  # the runner's API, once it is there
        self.last_papermill = self.last_ours = self.dvc_root = self.chain_root = tmp  # set as they are made

    def fresh(self, kind: str) -> Path:
        self.copies += 1
        dest = self.tmp / f"{kind}-{self.copies}"
        shutil.copytree(self.tmp / f"{kind}-template", dest, symlinks=True)
        return dest

    def metrics_bytes(self, root: Path) -> dict[str, bytes]:
        return {out: (root / out).read_bytes() for out in self.outputs if out.endswith(".json")}

    # 1. end to end ---------------------------------------------------------------------------------

    def papermill_cli(self) -> float:
        """The four notebook runs in sequence, as a user scripts them; a fresh copy."""
        root = self.fresh("iris")
        total = 0.0
        for name in self.order:
            total += run(papermill_argv(self.spec, name, self.nb_out), root)
        settle(root)
        got = self.metrics_bytes(root)
        if self.reference is None:
            self.reference = got
        elif got != self.reference:
            raise RuntimeError(f"papermill wrote other metrics in {root} than before")
        self.last_papermill = root
        return total

    def ours_cmd(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "jupyter_mlops", "pipeline", "run", "pipeline.yaml", "--no-progress", *extra]

    def ours_pipeline(self) -> float:
        """``pipeline run`` in a fresh copy: nothing cached."""
        root = self.fresh("iris")
        dt = run(self.ours_cmd(), root)
        settle(root)
        if self.reference is not None and self.metrics_bytes(root) != self.reference:
            raise RuntimeError(f"the pipeline run in {root} wrote other metrics than papermill's run")
        self.last_ours = root
        return dt

    # 2. no-op re-run -------------------------------------------------------------------------------

    def dvc_project(self) -> float | None:
        """The DAG as dvc.yaml, recorded in dvc.lock: by a ``dvc repro`` of a fresh copy (default run;
        its time is returned), or, with --quick, by ``dvc commit`` over the last papermill run's
        outputs (the same files; saves a whole run of the pipeline)."""
        import yaml

        if self.p["dvc_full_repro"]:
            root = self.fresh("iris")
        else:
            root = self.last_papermill
        (root / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml(self.spec, self.order, self.nb_out), sort_keys=False))
        self.dvc_root = root
        if self.p["dvc_full_repro"]:
            dt = run([tool("dvc"), "repro"], root)
            settle(root)
            if self.metrics_bytes(root) != self.reference:
                raise RuntimeError(f"dvc repro in {root} wrote other metrics than papermill's run")
            return dt
        run([tool("dvc"), "commit", "-f"], root)
        return None

    def dvc_noop(self) -> float:
        before = output_state(self.dvc_root, self.outputs)
        dt = run([tool("dvc"), "repro"], self.dvc_root, expect="Data and pipelines are up to date")
        if output_state(self.dvc_root, self.outputs) != before:
            raise RuntimeError("dvc repro rewrote outputs on a no-op run")
        return dt

    def ours_noop(self) -> float:
        before = output_state(self.last_ours, self.outputs)
        dt = run(self.ours_cmd(), self.last_ours)
        settle(self.last_ours)  # a pipeline run recorded even when every step is a hit
        if output_state(self.last_ours, self.outputs) != before:
            raise RuntimeError(f"the re-run in {self.last_ours} rewrote outputs: not every step was a cache hit")
        return dt

    # 3. overhead per step ----------------------------------------------------------------------------

    def papermill_inproc(self) -> float:
        """One in-process papermill run of the trivial notebook (papermill starts a kernel for it)."""
        import papermill

        root = self.chain_root
        t0 = time.perf_counter()
        with stdout_to_stderr():
            papermill.execute_notebook(str(root / TRIVIAL), str(self.nb_out / "trivial.out.ipynb"),
                                       parameters={"a": 100, "b": 2}, kernel_name="python3",
                                       progress_bar=False, cwd=str(root))
        return time.perf_counter() - t0

    def ours_chain(self, warm: bool = True) -> float:
        """The chain with every step forced to run; seconds per step.

        ``warm``: the steps take their kernels from a pool whose kernels are started and ready
        (the issue's "overhead per step on a pooled kernel"); else from the run's own pool, which
        starts them while earlier steps run (kernel start-up then shows in a chain of tiny steps).
        """
        from jupyter_mlops.kernels.pool import KernelPool

        root = self.chain_root
        n = self.p["chain_steps"]
        kwargs: dict[str, Any] = {"force": True}
        old = os.getcwd()
        os.chdir(root)  # the runner finds the project from the working directory
        pool = KernelPool("python3", size=n, cwd=root) if warm else None
        try:
            if pool is not None and not pool.wait_ready(n, timeout=180):
                raise RuntimeError("the kernel pool did not fill")
            with stdout_to_stderr():
                t0 = time.perf_counter()
                result = self.run_pipeline(str(root / "pipeline.yaml"), pool=pool, **kwargs)  # type: ignore[misc]
                dt = time.perf_counter() - t0
        finally:
            if pool is not None:
                pool.close()
            os.chdir(old)
        settle(root)  # the step runs upload in the background: not during the next measure
        steps = getattr(result, "steps", {}) or {}
        ran = sum(1 for s in steps.values() if getattr(s, "status", None) == "succeeded")
        if getattr(result, "ok", True) is False or (steps and ran != n):
            raise RuntimeError(f"the forced chain ran {ran} of {n} steps: {result!r}"[:2000])
        return dt / n


def runner_available() -> Callable[..., Any]:
    """``run_pipeline``, once the runner module and the ``pipeline run`` command both exist."""
    if importlib.util.find_spec("jupyter_mlops.pipelines.runner") is None:
        raise RunnerMissing("no module jupyter_mlops.pipelines.runner")
    done = subprocess.run([sys.executable, "-m", "jupyter_mlops", "pipeline", "run", "--help"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise RunnerMissing("`python -m jupyter_mlops pipeline run --help` fails: "
                            + (done.stderr.strip().splitlines() or ["?"])[-1])
    from jupyter_mlops.pipelines.runner import run_pipeline

    return run_pipeline


# -- the run ------------------------------------------------------------------------------------------

QUICK = dict(e2e_rounds=2, e2e_warmup=False, noop_rounds=3, chain_steps=4, chain_rounds=3, dvc_full_repro=False)
DEFAULT = dict(e2e_rounds=5, e2e_warmup=True, noop_rounds=7, chain_steps=8, chain_rounds=5, dvc_full_repro=True)


def run_all(p: dict[str, Any], tmp: Path, errors: dict[str, str]) -> dict[str, float | None]:
    m: dict[str, float | None] = {"pipeline_s": None, "step_overhead_s": None, "noop_rerun_s": None}
    b = Bench(tmp, p)
    try:
        b.run_pipeline = runner_available()
        ours = True
    except RunnerMissing as e:
        log(f"runner not available yet ({e}): measuring the anchors only; ours stays null")
        errors["runner"] = f"not available yet: {e}"
        ours = False
    except Exception as e:  # the module exists but does not import
        log(f"runner does not import ({type(e).__name__}: {e}): measuring the anchors only")
        errors["runner_import"] = f"{type(e).__name__}: {e}"
        ours = False

    def guarded(what: str, fn: Callable[[], dict[str, list[Any]]], fallback: Callable[[], dict[str, list[Any]]],
                possible: bool = True) -> dict[str, list[Any]]:
        """Ours failing is a finding, not a reason to lose the anchors' figures."""
        if not (ours and possible):
            return fallback()
        try:
            return fn()
        except Exception as e:
            log(f"ours failed in {what}: {e}")
            errors[what] = str(e)[-2000:]
            return fallback()

    # 1. end to end -----------------------------------------------------------------------------
    n = len(b.order)
    log(f"end to end: iris, {n} steps, a fresh copy each: {p['e2e_rounds']} x (papermill CLI x{n}, pipeline run)"
        + (" after a warm-up of each" if p["e2e_warmup"] else ""))
    res = guarded("pipeline_run", lambda: interleave(
        log, p["e2e_rounds"], [("papermill_cli", b.papermill_cli), ("ours", b.ours_pipeline)],
        warmup=[b.papermill_cli, b.ours_pipeline] if p["e2e_warmup"] else None,
    ), lambda: interleave(log, p["e2e_rounds"], [("papermill_cli", b.papermill_cli)],
                          warmup=[b.papermill_cli] if p["e2e_warmup"] else None))
    m["papermill_cli_s"] = median(res["papermill_cli"])
    if "ours" in res:
        m["pipeline_s"] = median(res["ours"])

    # 2. no-op re-run: in the copies of 1 --------------------------------------------------------------
    log("no-op re-run: the same DAG as dvc.yaml, " + ("populated by dvc repro" if p["dvc_full_repro"]
                                                      else "recorded by dvc commit over papermill's outputs"))
    first = b.dvc_project()
    if first is not None:
        m["dvc_repro_s"] = first
        log(f"  dvc repro, first run: {first:.3f} s")
    has_ours_copy = "ours" in res  # the copy ours ran in (if its first run failed, there is nothing to re-run)
    log(f"  {p['noop_rounds']} x (dvc repro, pipeline run) after a warm-up of each")
    res = guarded("noop_rerun", lambda: interleave(
        log, p["noop_rounds"], [("dvc_repro", b.dvc_noop), ("ours", b.ours_noop)],
        warmup=[b.dvc_noop, b.ours_noop],
    ), lambda: interleave(log, p["noop_rounds"], [("dvc_repro", b.dvc_noop)], warmup=[b.dvc_noop]),
        possible=has_ours_copy)
    m["dvc_repro_noop_s"] = median(res["dvc_repro"])
    if "ours" in res:
        m["noop_rerun_s"] = median(res["ours"])

    # 3. overhead per step ------------------------------------------------------------------------
    k = p["chain_steps"]
    b.chain_root = b.fresh("chain")
    log(f"overhead per step: {p['chain_rounds']} x (papermill in-process, a {k}-step chain forced) "
        "after a warm-up of each")
    res = guarded("step_overhead", lambda: interleave(
        log, p["chain_rounds"], [("papermill_inproc", b.papermill_inproc), ("ours", b.ours_chain)],
        warmup=[b.papermill_inproc, b.ours_chain],
    ), lambda: interleave(log, p["chain_rounds"], [("papermill_inproc", b.papermill_inproc)],
                          warmup=[b.papermill_inproc]))
    m["papermill_inproc_s"] = median(res["papermill_inproc"])
    if "ours" in res:
        m["step_overhead_s"] = median(res["ours"])
        m["chain_s"] = m["step_overhead_s"] * k
        # for the record: the same chain with the run's own pool, kernel start-up not hidden
        cold = guarded("chain_own_pool", lambda: {"ours": [b.ours_chain(warm=False)]}, dict)
        if cold.get("ours"):
            m["chain_own_pool_step_s"] = cold["ours"][0]
            log(f"  same chain, kernels started by the run itself: {cold['ours'][0]:.3f} s per step")

    # 4. loading a large matrix ---------------------------------------------------------------------
    rounds = 3 if p is QUICK else 5
    log(f"DAG of a {DAG_STEPS:,}-step matrix (two matrix steps, each input fed by one output): "
        f"{rounds} x load_pipeline + build_dag, in-process")
    res = guarded("dag_build", lambda: interleave(log, rounds, [("ours", dag_build(tmp))], warmup=[dag_build(tmp)]),
                  dict)
    if res.get("ours"):
        m["dag_build_10k_s"] = median(res["ours"])
    return m


#: Steps in the DAG-building measure (two matrix steps of half as many values each).
DAG_STEPS = 10_000


def dag_build(tmp: Path) -> Callable[[], float]:
    """A timer of load_pipeline + build_dag for a pipeline of :data:`DAG_STEPS` steps: ``make[n=i]``
    writes ``parts/i.csv``, ``use[n=i]`` reads it (the old pairwise scan compared 10^8 pairs)."""
    folder = tmp / "dag"
    if not folder.is_dir():
        folder.mkdir()
        notebook = {"cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "source": "n = 0",
                               "outputs": [], "execution_count": None}],
                    "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
                    "nbformat": 4, "nbformat_minor": 5}
        (folder / "step.ipynb").write_text(json.dumps(notebook))
        values = ", ".join(str(i) for i in range(DAG_STEPS // 2))
        (folder / "pipeline.yaml").write_text(
            "steps:\n"
            f"  make: {{notebook: step.ipynb, matrix: {{n: [{values}]}}, outputs: ['parts/{{n}}.csv']}}\n"
            f"  use: {{notebook: step.ipynb, matrix: {{n: [{values}]}}, inputs: ['parts/{{n}}.csv'], "
            "outputs: ['used/{n}.csv']}\n")

    def measure() -> float:
        from jupyter_mlops.pipelines.dag import build_dag
        from jupyter_mlops.pipelines.spec import load_pipeline

        started = time.perf_counter()
        dag = build_dag(load_pipeline(folder / "pipeline.yaml", max_steps=DAG_STEPS))
        took = time.perf_counter() - started
        assert len(dag.parents) == DAG_STEPS and dag.parents["use[n=7]"] == {"make[n=7]"}
        return took

    return measure


def main(argv: list[str] | None = None) -> int:
    quick = quick_mode(__doc__, "fewer repeats, a 4-step chain (< 60 s on 2 cores)", argv)
    p = QUICK if quick else DEFAULT

    started = time.perf_counter()
    errors: dict[str, str] = {}
    with scratch("bench-pipelines-") as tmp:
        log(f"temp folder {tmp}; {'quick' if quick else 'default'} mode: {p}")
        try:
            m = run_all(p, tmp, errors)
        finally:
            stop_flushers(tmp)  # before the folder goes: the flushers write there
    wall = time.perf_counter() - started
    report(m, p, errors, wall, quick)
    return 1 if set(errors) - {"runner"} else 0


def report(m: dict[str, float | None], p: dict[str, Any], errors: dict[str, str], wall: float, quick: bool) -> None:
    ratios = {
        "vs_papermill_cli": ratio(m, "papermill_cli_s", "pipeline_s"),
        "vs_papermill_inproc": ratio(m, "papermill_inproc_s", "step_overhead_s"),
        "vs_dvc_repro_noop": ratio(m, "dvc_repro_noop_s", "noop_rerun_s"),
        "vs_dvc_repro": ratio(m, "dvc_repro_s", "pipeline_s"),
    }
    if "dvc_repro_s" not in m:
        ratios.pop("vs_dvc_repro")

    k = p["chain_steps"]
    rows = [
        # measure, anchor, anchor metric, ours metric, ratio, goal keys (on ours or on the ratio)
        ("iris pipeline, end to end", "papermill CLI x4", "papermill_cli_s", "pipeline_s", "vs_papermill_cli",
         ["vs_papermill_cli"]),
        ("  same, dvc repro first run", "dvc repro (CLI)", "dvc_repro_s", "pipeline_s", "vs_dvc_repro", []),
        (f"overhead per step ({k} chained)", "papermill in-proc", "papermill_inproc_s", "step_overhead_s",
         "vs_papermill_inproc", ["step_overhead_s"]),
        ("no-op re-run, all cached", "dvc repro (CLI)", "dvc_repro_noop_s", "noop_rerun_s", "vs_dvc_repro_noop",
         ["noop_rerun_s"]),
    ]
    print()
    print(f"pipelines benchmark ({'--quick' if quick else 'default'}): medians; ratio = anchor / ours, bigger is better")
    print(f"  end to end x{p['e2e_rounds']}, no-op x{p['noop_rounds']}, chain of {k} x{p['chain_rounds']}; "
          f"total {wall:.0f} s")
    header = f"{'measure':<30} {'anchor':<18} {'anchor':>9} {'ours':>9} {'ratio':>9}  {'goal':<24} met"
    print(header)
    print("-" * len(header))
    for label, anchor_name, a_key, o_key, r_key, goal_keys in rows:
        if a_key not in m:
            continue
        r = ratios.get(r_key)
        goals = [(g, GOALS[g], goal_met(m[g] if g in m else ratios.get(g), GOALS[g])) for g in goal_keys]
        goal_txt = ", ".join(f"{g} {t}" for g, t, _ in goals)
        met = ", ".join(ok for _, _, ok in goals)
        r_txt = f"{r:>8.2f}x" if r is not None else f"{'-':>9}"
        print(f"{label:<30} {anchor_name:<18} {fmt(m[a_key], 's'):>9} {fmt(m.get(o_key), 's'):>9} "
              f"{r_txt}  {goal_txt:<24} {met}")
    for what, why in errors.items():
        print(f"ours: {what}: {why.splitlines()[0] if why else ''}")
    if m.get("dag_build_10k_s") is not None:
        print(f"{f'DAG of a {DAG_STEPS:,}-step matrix':<30} {'(none)':<18} {'':>9} {fmt(m['dag_build_10k_s'], 's'):>9}")
    print()
    metrics = {key: (round(v, 4) if v is not None else None) for key, v in m.items()}
    out = {"bench": "pipelines", "metrics": metrics, "ratios": ratios, "goals": GOALS}
    if errors:
        out["errors"] = {key: why.splitlines()[0] if why else "" for key, why in errors.items()}
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
