"""Pipeline steps as Jobs and schedules as CronJobs, against the API emulator and kubelet stand-in of
tests/k8s: the real kubernetes_asyncio client, Jobs whose pods run ``python -m
jupyter_mlops.k8s.step_entry`` as local processes (this machine's Python stands in for the image),
output notebooks and tracked runs coming back through the pods' logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import kubernetes_validate
import pytest
from kubernetes_validate.utils import all_versions
from packaging.version import Version

from jupyter_mlops.cli import main as cli
from jupyter_mlops.k8s.names import namespace_for
from jupyter_mlops.kernels.launch import current_user
from jupyter_mlops.pipelines.runner import run_pipeline

from .conftest import Project, make_notebook
from .k8s.emulator import running_cluster
from .k8s.kubelet import Node

pytest.importorskip("kubernetes_asyncio")

VERSIONS = sorted(set(all_versions()), key=Version)
EDGE_VERSIONS = [VERSIONS[0], VERSIONS[-1]]
CONFIG = """\
c.Kubernetes.api_host = {url!r}
c.Kubernetes.role_quotas = {{"*": {{"cpu": "4", "memory": "8Gi", "pods": 6}}}}
c.KernelProfiles.profiles = {{"small": {{"cpu": 0.5, "memory": "1Gi"}},
                              "huge": {{"cpu": 64, "memory": "1Gi"}}}}
"""


class Cluster:
    """The emulated cluster, running in a thread of its own while the (synchronous) runner runs here."""

    def __init__(self, loop: asyncio.AbstractEventLoop, api: Any, kubelet: Any) -> None:
        self.loop, self.api, self.kubelet = loop, api, kubelet
        self.namespace = namespace_for(current_user())
        self.manifests: list[dict[str, Any]] = []  # every Job and CronJob the product created

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def objects(self, resource: str) -> list[dict[str, Any]]:
        async def read() -> list[dict[str, Any]]:
            return self.api.store.list(resource)

        return self.call(read())

    def wait(self, what: Any, timeout: float = 60) -> Any:
        """``what()`` (run in the cluster's loop) once it is truthy; the store's change queue wakes it."""
        async def until() -> Any:
            changed = asyncio.Event()
            unsubscribe = self.api.store.subscribe(lambda change: changed.set())
            try:
                while not (found := what()):
                    changed.clear()
                    await changed.wait()
                return found
            finally:
                unsubscribe()

        return self.call(asyncio.wait_for(until(), timeout), timeout + 5)


@pytest.fixture
def mlops_k8s(mlops_project: Project, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    envs = tmp_path / "environments"
    for name, extra in (("demo", "image: registry.example/demo:1\nvariables: {GREETING: 'hi $(USER) $$1'}\n"),
                        ("noimage", "")):
        (envs / name).mkdir(parents=True)
        (envs / name / "environment.yml").write_text(f"channels: [conda-forge]\ndependencies: [python=3.11]\n{extra}")
    monkeypatch.setenv("MLOPS_ENVIRONMENTS_DIR", str(envs))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    context = running_cluster(nodes=[Node("cpu-1", cpu="4", memory="16Gi")])
    _, api, kubelet = asyncio.run_coroutine_threadsafe(context.__aenter__(), loop).result(30)
    cluster = Cluster(loop, api, kubelet)
    original = api.api.create

    def recording(rt: Any, namespace: str, body: Any, *args: Any, **kwargs: Any) -> Any:
        if rt.plural in ("jobs", "cronjobs") and not (body.get("metadata") or {}).get("ownerReferences"):
            cluster.manifests.append(json.loads(json.dumps(body)))  # as the product sent it
        return original(rt, namespace, body, *args, **kwargs)

    api.api.create = recording
    (mlops_project.root / "jupyter_mlops_config.py").write_text(CONFIG.format(url=api.url))
    try:
        yield cluster
        left = [f"{r}/{o['metadata']['name']}" for r in ("jobs", "pods") for o in cluster.objects(r)]
        assert not left, f"left in the cluster: {left}"
        for manifest in cluster.manifests:  # every Job and CronJob the product sent, as the schemas say
            for version in EDGE_VERSIONS:
                kubernetes_validate.validate(manifest, version, strict=True)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(context.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def pipeline(project: Project, steps: str, notebooks: dict[str, tuple[list[str], str]]) -> Path:
    for name, (cells, parameters) in notebooks.items():
        make_notebook(project.root / f"{name}.ipynb", cells, parameters)
    (project.root / "pipeline.yaml").write_text(f"name: k8s\nsteps:\n{steps}")
    return project.root / "pipeline.yaml"


def run(project: Project, **kwargs: Any) -> Any:
    kwargs.setdefault("retry_backoff", 0.01)
    return run_pipeline(project.root / "pipeline.yaml", config=project.config(pipeline_executor="kubernetes"), **kwargs)


def outputs(path: str | None) -> list[str]:
    nb = json.loads(Path(path or "").read_text())
    return ["".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []) if o.get("output_type") == "stream"]


def test_two_steps_run_as_jobs_and_their_notebooks_and_runs_come_back(mlops_k8s: Cluster, mlops_project: Project) -> None:
    pipeline(mlops_project, """\
  first:
    notebook: first.ipynb
    environment: demo
    parameters: {n: 3, text: "costs $(HOME) and $$5"}
  second:
    notebook: second.ipynb
    environment: demo
    needs: [first]
""", {"first": (["%load_ext jupyter_mlops\n%mlops track", "%mlops log squared={n * n}",
                 "import os\nprint(text, n * n, os.environ['GREETING'])"], "n = 1\ntext = ''"),
      "second": (["import os\nprint('pod', os.environ['HOSTNAME'])"], "")})
    cells: list[tuple[str, tuple[int, int] | None]] = []
    result = run(mlops_project, listener=lambda r, step: cells.append((step.name, step.cell)))
    assert result.ok, {n: s.error for n, s in result.steps.items()}
    first, second = result.steps["first"], result.steps["second"]
    # user text stays data: Kubernetes' $(VAR) expansion touched neither parameters nor variables
    assert outputs(first.output_notebook)[-1] == "costs $(HOME) and $$5 9 hi $(USER) $$1\n"
    assert outputs(second.output_notebook)[0].startswith("pod step-second-")  # it ran in the Job's pod
    assert ("first", (4, 4)) in cells  # progress came from the pod's log as the cells started (the author's code cells)
    jobs = [m for m in mlops_k8s.manifests if m["kind"] == "Job"]
    assert [j["metadata"]["labels"]["mlops.jupyter.org/step"] for j in jobs] == ["first", "second"]
    spec = jobs[0]["spec"]
    assert spec["backoffLimit"] == 0 and spec["template"]["spec"]["containers"][0]["image"] == "registry.example/demo:1"
    assert spec["template"]["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "500m", "memory": "1Gi"}
    assert jobs[0]["metadata"]["namespace"] == mlops_k8s.namespace
    # %mlops track in the pod recorded into the step's own run, as it does locally
    assert cli(["sync"]) == 0
    client = mlops_project.client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    step_run = next(r for r in runs if r.data.tags.get("mlops.step") == "first")
    assert step_run.data.metrics["squared"] == 9.0 and step_run.info.status == "FINISHED"
    assert len(runs) == 3  # the pipeline's and one per step: the pod made none of its own


def test_a_failing_notebook_fails_its_step_in_one_line_with_its_partial_output(mlops_k8s: Cluster,
                                                                                mlops_project: Project) -> None:
    pipeline(mlops_project, """\
  broken:
    notebook: broken.ipynb
    environment: demo
    retries: 1
""", {"broken": (["print('before')", "raise ValueError('boom\\nsecond line')"], None)})
    step = run(mlops_project).steps["broken"]
    assert (step.status, step.attempts) == ("failed", 2)  # retried by the runner: the Jobs have backoffLimit 0
    assert step.error == f"code cell 2 of 2 raised ValueError: boom second line; the partial output is in {step.output_notebook}"
    assert outputs(step.output_notebook) == ["before\n"]
    assert len([m for m in mlops_k8s.manifests if m["kind"] == "Job"]) == 2  # one Job per attempt


def test_a_step_timeout_is_the_jobs_deadline_and_says_so(mlops_k8s: Cluster, mlops_project: Project) -> None:
    pipeline(mlops_project, """\
  slow:
    notebook: slow.ipynb
    environment: demo
    timeout: 6
""", {"slow": (["print('started', flush=True)", "import time\ntime.sleep(300)"], None)})
    started = time.monotonic()
    step = run(mlops_project).steps["slow"]
    assert step.status == "failed" and time.monotonic() - started < 40
    assert step.error == ("timed out after 6 s (DeadlineExceeded: the Job ran past its activeDeadlineSeconds); "
                          f"the partial output is in {step.output_notebook}")
    assert outputs(step.output_notebook) == ["started\n"]  # printed by the pod when the deadline stopped it
    assert mlops_k8s.manifests[0]["spec"]["activeDeadlineSeconds"] == 6


def test_steps_that_cannot_run_fail_at_once_saying_why(mlops_k8s: Cluster, mlops_project: Project) -> None:
    (mlops_project.root / "data.csv").write_text("a,b\n")
    pipeline(mlops_project, """\
  huge:
    notebook: step.ipynb
    environment: demo
    profile: huge
  greedy:
    notebook: step.ipynb
    environment: demo
    profile: greedy
  bare:
    notebook: step.ipynb
  imageless:
    notebook: step.ipynb
    environment: noimage
  reads:
    notebook: step.ipynb
    environment: demo
    inputs: [data.csv]
""", {"step": (["print('never')"], None)})
    with open(mlops_project.root / "jupyter_mlops_config.py", "a") as f:
        f.write('c.KernelProfiles.profiles["greedy"] = {"cpu": 2000, "memory": "1Gi"}\n'
                'c.Kubernetes.role_quotas = {"*": {"cpu": "100", "memory": "8Gi", "pods": 6}}\n')
    started = time.monotonic()
    result = run(mlops_project, workers=5)
    errors = {name: step.error for name, step in result.steps.items()}
    assert time.monotonic() - started < 20, "said when the cluster knew, not at a timeout"
    assert errors["huge"].startswith("pod step-huge-") and "Unschedulable: 0/1 nodes are available: 1 Insufficient " \
        "cpu." in errors["huge"] and errors["huge"].endswith("choose a smaller profile, or wait for capacity")
    assert errors["greedy"].startswith("the Job could not make its pod: Error creating: ") and "exceeded quota" in errors["greedy"]
    assert errors["bare"].startswith("a step on Kubernetes runs in an environment's image: add `environment: NAME`")
    assert errors["imageless"].startswith("environment 'noimage' has no `image:`; add the image")
    assert errors["reads"].startswith("not supported yet: data inputs and outputs on Kubernetes need a DVC remote")
    assert all("\n" not in e for e in errors.values())
    assert {m["spec"]["template"]["metadata"]["labels"]["mlops.jupyter.org/step"] for m in mlops_k8s.manifests} == \
        {"huge", "greedy"}  # the others were refused before anything reached the cluster


def test_ctrl_c_cancels_the_run_and_deletes_its_jobs(mlops_k8s: Cluster, mlops_project: Project) -> None:
    import signal
    import subprocess
    import sys

    pipeline(mlops_project, """\
  one:
    notebook: sleep.ipynb
    environment: demo
  two:
    notebook: sleep.ipynb
    environment: demo
""", {"sleep": (["print('sleeping', flush=True)", "import time\ntime.sleep(300)"], None)})
    with open(mlops_project.root / "jupyter_mlops_config.py", "a") as f:
        f.write('c.MlopsConfig.pipeline_executor = "kubernetes"\n')
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_mlops", "pipeline", "run", "pipeline.yaml", "--no-progress"],
                            cwd=mlops_project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def both_running() -> bool:
            pods = mlops_k8s.api.store.list("pods")
            return len(pods) == 2 and all(p["status"].get("phase") == "Running" for p in pods)

        mlops_k8s.wait(both_running)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out
    assert "cancelled" in out
    deletes = [r for r in mlops_k8s.api.requests if r.verb == "delete" and r.resource == "jobs"]
    assert len(deletes) == 2 and {r.query.get("propagationPolicy") for r in deletes} == {"Foreground"}
    # the run's close() waited until the Jobs and their pods were gone (the fixture checks it too)
    assert not mlops_k8s.objects("jobs") and not mlops_k8s.objects("pods")


def test_a_schedule_runs_as_a_cronjob_and_forbid_holds(mlops_k8s: Cluster, mlops_project: Project,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from jupyter_mlops.pipelines.scheduler import Scheduler
    from jupyter_mlops.pipelines.state import open_store

    pipeline(mlops_project, """\
  tick:
    notebook: tick.ipynb
""", {"tick": (["import time\ntime.sleep(1)", "print('tick', n)"], "n = 0")})
    with open(mlops_project.root / "jupyter_mlops_config.py", "a") as f:
        f.write(f'c.Kubernetes.pipeline_image = "registry.example/project:1"\n'
                f'c.Kubernetes.pipeline_project_dir = {str(mlops_project.root)!r}\n')  # the "image" is this machine
    store = open_store(mlops_project.config().resolved_pipeline_state_url)
    scheduler = Scheduler(store)
    scheduler.add(mlops_project.root / "pipeline.yaml", "*/5 * * * *", parameters={"n": "7"}, name="ticker")
    scheduler.add(mlops_project.root / "pipeline.yaml", "@daily", tz="Europe/Berlin", policy="catch_up", name="nightly")
    scheduler.pause("nightly")

    assert cli(["schedule", "export", "--kubernetes"]) == 0
    exported = {d["metadata"]["name"]: d for d in yaml.safe_load_all(capsys.readouterr().out)}
    ticker, nightly = exported["ticker"]["spec"], exported["nightly"]["spec"]
    assert (ticker["schedule"], ticker["timeZone"], ticker["concurrencyPolicy"], ticker["startingDeadlineSeconds"],
            ticker["suspend"]) == ("*/5 * * * *", "UTC", "Forbid", 60, False)
    assert (nightly["schedule"], nightly["timeZone"], nightly["startingDeadlineSeconds"], nightly["suspend"]) == \
        ("0 0 * * *", "Europe/Berlin", 98 * 86400, True)
    container = ticker["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][3:] == ["pipeline", "run", str(mlops_project.root / "pipeline.yaml"), "--schedule-id", "ticker",
                                        "--no-progress", "-p", "n=7"]

    assert cli(["schedule", "export", "--kubernetes", "--apply"]) == 0
    assert capsys.readouterr().out.splitlines() == ["CronJob nightly created", "CronJob ticker created"]
    namespace = mlops_k8s.namespace
    job = mlops_k8s.call(mlops_k8s.kubelet.trigger_cronjob(namespace, "ticker"))
    assert job is not None
    assert mlops_k8s.call(mlops_k8s.kubelet.trigger_cronjob(namespace, "ticker")) is None  # Forbid: one at a time

    def finished(name: str) -> Any:
        found = mlops_k8s.api.store.get("jobs", namespace, name)
        return next((c["type"] for c in (found or {}).get("status", {}).get("conditions", [])
                     if c["type"] in ("Complete", "Failed") and c["status"] == "True"), None)

    assert mlops_k8s.wait(lambda: finished(job), timeout=90) == "Complete"
    rows = store.query("SELECT status, schedule_id FROM pipeline_runs")
    assert [(r["status"], r["schedule_id"]) for r in rows] == [("succeeded", "ticker")]
    again = mlops_k8s.call(mlops_k8s.kubelet.trigger_cronjob(namespace, "ticker"))
    assert again is not None  # Forbid holds only while a run goes on
    assert mlops_k8s.wait(lambda: finished(again), timeout=90) == "Complete"
    scheduler.pause("ticker")
    assert cli(["schedule", "export", "--kubernetes", "--apply"]) == 0
    assert capsys.readouterr().out.splitlines() == ["CronJob ticker replaced", "CronJob nightly unchanged"]
    assert mlops_k8s.api.store.get("cronjobs", namespace, "ticker")["spec"]["suspend"] is True

    scheduler.remove("nightly")
    scheduler.remove("ticker")
    assert cli(["schedule", "export", "--kubernetes", "--apply"]) == 0
    assert capsys.readouterr().out.splitlines() == ["CronJob nightly deleted", "CronJob ticker deleted"]
    # a removed schedule's history goes with it
    mlops_k8s.wait(lambda: not mlops_k8s.api.store.list("jobs") and not mlops_k8s.api.store.list("pods"))


# the wire format between a step's pod and the runner, without a cluster ----------------------------------


def test_the_pods_log_is_read_whatever_else_the_container_prints() -> None:
    from jupyter_mlops.k8s.step_entry import PREFIX, StepLog, _payload_lines

    notebook = json.dumps({"cells": [{"source": "x" * 5000}]}).encode()
    ours = _payload_lines("notebook", notebook) + [PREFIX + b"cell 2 3", PREFIX + b"error cell 2 raised KeyError: 'k'"]
    mixed = b"".join(line + b"\n" + (b"[IPKernelApp] WARNING | something\n" if i % 3 == 0 else b"")
                     for i, line in enumerate(ours))
    cells: list[tuple[int, int]] = []
    log = StepLog(lambda n, m: cells.append((n, m)))
    for start in range(0, len(mixed), 7):  # any pieces, lines split anywhere
        log.feed(mixed[start:start + 7])
    log.close()
    assert log.payload("notebook") == notebook and cells == [(2, 3)] and log.error == "cell 2 raised KeyError: 'k'"
    assert log.lines and all(line.startswith("[IPKernelApp]") for line in log.lines)

    damaged, short = StepLog(), StepLog()
    lines = _payload_lines("notebook", notebook)
    damaged.feed(b"\n".join(lines[:2] + [lines[2][:-4] + b"AAAA"] + lines[3:]) + b"\n")
    short.feed(b"\n".join(lines[:-2] + lines[-1:]) + b"\n")
    assert damaged.payload("notebook") is None and short.payload("notebook") is None


def test_runs_tracked_in_a_pod_are_taken_only_when_they_cannot_reach_beyond_the_step(tmp_path: Path) -> None:
    import io
    import tarfile

    from jupyter_mlops.k8s.step_entry import receive_spool

    def run(spool_id: str, artifact: str = "0/model.txt", **header: Any) -> dict[str, bytes]:
        head = {"spool_id": spool_id, "tracking_uri": "http://attacker.example", "artifact_root": "file:///etc",
                "attach_spool_id": "STEP", **header}
        return {f"{spool_id}/run.json": json.dumps(head).encode(),
                f"{spool_id}/events.log": f"m\tloss\t0.5\t1\t0\na\t{json.dumps({'src': artifact})}\n".encode()}

    files = {**run("good"), **run("nested", attach_spool_id=None, parent_spool_id="good"),
             **run("other", attach_spool_id="SOMEONE-ELSES"), **run("byid", run_id="0123abcd"),
             **run("leak", artifact="../../../../etc/passwd"), **run("exists"), "../escape/run.json": b"{}"}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("good/files/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    spool = tmp_path / "spool"
    (spool / "exists").mkdir(parents=True)
    taken = receive_spool(buffer.getvalue(), spool, tracking_uri="sqlite:///runner.db", artifact_root=None,
                          attach_spool_id="STEP")
    assert taken == ["good", "nested"]
    header = json.loads((spool / "good" / "run.json").read_text())
    assert (header["tracking_uri"], header["artifact_root"]) == ("sqlite:///runner.db", None)
    assert not (spool / "good" / "files").exists() and not list((spool / "exists").iterdir())
    assert sorted(p.name for p in spool.iterdir()) == ["exists", "good", "nested"]  # nothing else, no temp folder
    assert not (tmp_path / "escape").exists()
