"""Schedules as CronJobs: the schedules of the state database, run by Kubernetes instead of
``jupyter mlops scheduler``.

A schedule (:class:`~jupyter_mlops.pipelines.scheduler.Schedule`) becomes a CronJob named by its id,
in the namespace of the user exporting it, whose Job runs ``python -m jupyter_mlops pipeline run
PIPELINE --schedule-id ID -p KEY=VALUE ...`` (what the local scheduler starts, and what ``jupyter
mlops pipeline run`` is) in ``c.Kubernetes.pipeline_image``, an image that holds the project at
``c.Kubernetes.pipeline_project_dir``. The run's steps then run in that pod on local kernels, or as
Jobs of their own when the image's configuration says ``pipeline_executor = "kubernetes"``.

The local scheduler's rules, in Kubernetes' words:

* the lease (never the same schedule twice at once): ``concurrencyPolicy: Forbid``;
* ``--policy skip``: ``startingDeadlineSeconds: 60``, the local scheduler's grace: a fire the
  controller could not act on within a minute is skipped;
* ``--policy catch_up``: one run for a missed window, which the CronJob controller does by itself
  (it starts the latest missed fire once). Its window is ``startingDeadlineSeconds``: 98 times the
  shortest interval between fires, since the controller refuses to start anything when it counts
  more than 100 missed fires;
* a paused schedule: ``suspend: true``; the zone: ``timeZone`` (UTC when none);
* the state database and the tracking server reach the pod as MLOPS_PIPELINE_STATE_URL and
  MLFLOW_TRACKING_URI when they are servers (a local SQLite file means nothing in a pod).

:func:`apply_schedules` makes the cluster match the schedules: creates, replaces (when changed) and
deletes CronJobs labelled as made from the same state database, so two projects exporting into one
namespace never touch each other's.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, KubernetesError

__all__ = ["cronjob_for_schedule", "cronjobs_for_schedules", "apply_schedules", "apply_cronjobs", "Applied",
           "LABEL_SCHEDULE", "LABEL_SOURCE", "SKIP_DEADLINE"]

LABEL_SCHEDULE = "mlops.jupyter.org/schedule"
LABEL_SOURCE = "mlops.jupyter.org/schedules-from"  # hash of the state database the schedules are in
ANNOTATION_PIPELINE = "mlops.jupyter.org/pipeline-file"
ANNOTATION_HASH = "mlops.jupyter.org/manifest-sha256"
SKIP_DEADLINE = 60  # seconds: the local scheduler's grace for a fire to count as on time
HISTORY_TTL = 7 * 86400  # seconds a finished Job of a schedule stays at most
_SERVER_SCHEMES = ("http://", "https://", "postgresql", "mysql", "mssql", "databricks")


def cronjob_for_schedule(schedule: Any, pipeline_path: str, settings: Any, *, namespace: str, profile: Any,
                         source: str, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The CronJob of ``schedule``; ``pipeline_path``: its pipeline file inside the image.

    ``profile``: the resources of the pipeline's pod; ``source``: a label value naming where the
    schedules come from (see :func:`source_label`); ``env``: more environment for the pod. Raises
    :class:`ConfigError` when ``c.Kubernetes.pipeline_image`` is not set.
    """
    from . import manifests
    from .names import label_value

    if not settings.pipeline_image:
        raise ConfigError("schedules on Kubernetes run in an image holding the project: set "
                          "c.Kubernetes.pipeline_image (and c.Kubernetes.pipeline_project_dir, where the project is "
                          "in it)", source="c.Kubernetes.pipeline_image")
    command = ["python", "-m", "jupyter_mlops", "pipeline", "run", pipeline_path, "--schedule-id", schedule.id,
               "--no-progress"]
    if schedule.force:
        command.append("--force")
    for key, value in schedule.parameters.items():
        command += ["-p", f"{key}={value}"]
    pod_env = {"MLOPS_SCHEDULE_ID": schedule.id, "MLOPS_PROJECT_ROOT": settings.pipeline_project_dir, **(env or {})}
    job = manifests.step_job(
        name=schedule.id, namespace=namespace, image=settings.pipeline_image, command=command, env=pod_env,
        profile=profile, labels={manifests.COMPONENT: "pipeline", LABEL_SCHEDULE: label_value(schedule.id),
                                 LABEL_SOURCE: source},
        backoff_limit=0, service_account=settings.service_account or None,
        image_pull_policy=settings.image_pull_policy,
        # the CronJob's history limits keep the latest Jobs; the TTL removes, at the latest, the Jobs
        # still running when their schedule was deleted, which no CronJob owns any more
        ttl_seconds_after_finished=HISTORY_TTL)
    cron = manifests.schedule_cronjob(
        name=schedule.id, namespace=namespace, schedule=schedule.cron, time_zone=schedule.tz, job=job,
        concurrency_policy="Forbid", starting_deadline_seconds=starting_deadline(schedule),
        suspend=bool(schedule.paused))
    cron["metadata"]["labels"][LABEL_SOURCE] = source
    digest = hashlib.sha256(json.dumps(cron, sort_keys=True).encode()).hexdigest()
    cron["metadata"]["annotations"] = {ANNOTATION_PIPELINE: str(schedule.pipeline_file), ANNOTATION_HASH: digest}
    return manifests.check(cron)


def starting_deadline(schedule: Any) -> int:
    """``startingDeadlineSeconds`` for the schedule's policy (see the module's docstring)."""
    if schedule.policy != "catch_up":
        return SKIP_DEADLINE
    fires = schedule.expression.fires_between(datetime(2001, 1, 1, tzinfo=timezone.utc),
                                              datetime(2101, 1, 1, tzinfo=timezone.utc), limit=200)
    gaps = [int((b - a).total_seconds()) for a, b in zip(fires, fires[1:])]
    return max(SKIP_DEADLINE, 98 * min(gaps, default=86400))


def source_label(state_url: str) -> str:
    """Where schedules come from, as a label value: the hash of the state database's URL."""
    return hashlib.sha256(state_url.encode()).hexdigest()[:16]


def pod_environment(config: Any) -> dict[str, str]:
    """What a pipeline pod must know of this configuration: the state database and the tracking
    server, when they are servers it can reach (an embedded SQLite store stays on this machine)."""
    env = {}
    if config.pipeline_state_url.startswith(_SERVER_SCHEMES):
        env["MLOPS_PIPELINE_STATE_URL"] = config.pipeline_state_url
    if config.tracking_uri.startswith(_SERVER_SCHEMES):
        env["MLFLOW_TRACKING_URI"] = config.tracking_uri
    return env


def cronjobs_for_schedules(schedules: Iterable[Any], config: Any, *, user: str | None = None) -> list[dict[str, Any]]:
    """The CronJobs of ``schedules`` for ``config`` (an :class:`~jupyter_mlops.config.MlopsConfig`),
    in ``user``'s namespace (default: this process's user). Raises :class:`ConfigError` naming what to
    set or fix (no image, a pipeline outside the project, a profile)."""
    from ..kernels.launch import current_user
    from ..kernels.profiles import KernelProfiles
    from .names import namespace_for
    from .settings import KubernetesSettings

    settings = KubernetesSettings(config=config.config)
    user = user or current_user()
    namespace = namespace_for(user, settings.namespace_template)
    profile = KernelProfiles(config=config.config).get(None, user)
    source = source_label(config.resolved_pipeline_state_url)
    root = config.root
    made = []
    for schedule in schedules:
        try:
            relative = Path(schedule.pipeline_file).resolve().relative_to(root)
        except ValueError:
            raise ConfigError(f"schedule {schedule.id}: its pipeline {schedule.pipeline_file} is outside the project "
                              f"({root}), and the pipeline image holds the project only") from None
        path = str(PurePosixPath(settings.pipeline_project_dir) / relative.as_posix())
        made.append(cronjob_for_schedule(schedule, path, settings, namespace=namespace, profile=profile,
                                         source=source, env=pod_environment(config)))
    return made


@dataclass
class Applied:
    """What :func:`apply_cronjobs` did, by CronJob name."""

    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


async def apply_cronjobs(batch: Any, namespace: str, source: str, wanted: list[dict[str, Any]]) -> Applied:
    """Make the CronJobs labelled ``source`` in ``namespace`` exactly ``wanted``: create what is
    missing, replace what changed, delete the rest with their finished Jobs (a run going on
    finishes; its Job's TTL removes it). A CronJob of that name from another source is refused."""
    from kubernetes_asyncio.client.exceptions import ApiException

    from .client import MANAGED_SELECTOR
    from .jobs import _api_message

    applied = Applied()
    try:
        listed = await batch.list_namespaced_cron_job(namespace, label_selector=f"{MANAGED_SELECTOR},{LABEL_SOURCE}={source}",
                                                      _preload_content=False)
        found = json.loads(await listed.read())
        if listed.status >= 300:
            raise KubernetesError(f"listing CronJobs in {namespace}: {listed.status} {found.get('message', '')}")
        existing = {item["metadata"]["name"]: item for item in found.get("items") or []}
        for body in wanted:
            name = body["metadata"]["name"]
            current = existing.pop(name, None)
            if current is None:
                try:
                    await batch.create_namespaced_cron_job(namespace, body)
                except ApiException as e:
                    if e.status == 409:
                        raise KubernetesError(f"a CronJob {namespace}/{name} exists that other schedules made; give "
                                              "this schedule another name (jupyter mlops schedule add --name)") from e
                    raise
                applied.created.append(name)
            elif (current["metadata"].get("annotations") or {}).get(ANNOTATION_HASH) == \
                    body["metadata"]["annotations"][ANNOTATION_HASH]:
                applied.unchanged.append(name)
            else:
                replacement = {**body, "metadata": {**body["metadata"],
                                                    "resourceVersion": current["metadata"]["resourceVersion"]}}
                await batch.replace_namespaced_cron_job(name, namespace, replacement)
                applied.replaced.append(name)
        for name in sorted(existing):
            await _delete(batch, namespace, name, existing[name]["metadata"]["labels"][LABEL_SCHEDULE], source)
            applied.deleted.append(name)
    except ApiException as e:
        raise KubernetesError(_api_message(e, f"applying CronJobs in {namespace}")) from e
    return applied


async def _delete(batch: Any, namespace: str, name: str, schedule: str, source: str) -> None:
    """A schedule's CronJob (its running Job orphaned, to finish) and its finished Jobs (its history)."""
    from kubernetes_asyncio.client.exceptions import ApiException

    async def gone(call: Any) -> None:
        try:
            await call
        except ApiException as e:
            if e.status != 404:  # already gone: what we wanted
                raise

    await gone(batch.delete_namespaced_cron_job(name, namespace, propagation_policy="Orphan"))
    listed = await batch.list_namespaced_job(namespace, label_selector=f"{LABEL_SCHEDULE}={schedule},{LABEL_SOURCE}={source}",
                                             _preload_content=False)
    for job in json.loads(await listed.read()).get("items") or []:
        conditions = (job.get("status") or {}).get("conditions") or []
        if any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True" for c in conditions):
            await gone(batch.delete_namespaced_job(job["metadata"]["name"], namespace, propagation_policy="Background"))


def apply_schedules(schedules: Iterable[Any], config: Any, *, user: str | None = None) -> Applied:
    """Export ``schedules`` as CronJobs and apply them to the cluster ``c.Kubernetes.*`` names
    (making the user's namespace if needed). Raises :class:`KubernetesError` or :class:`ConfigError`."""
    from ..kernels.launch import current_user
    from .jobs import ensure_namespace
    from .names import namespace_for
    from .settings import KubernetesSettings

    settings = KubernetesSettings(config=config.config)
    user = user or current_user()
    wanted = cronjobs_for_schedules(schedules, config, user=user)
    namespace = namespace_for(user, settings.namespace_template)

    async def apply() -> Applied:
        from kubernetes_asyncio import client

        from .client import connect

        api = await connect(settings)
        try:
            await ensure_namespace(client.CoreV1Api(api), namespace, user, settings)
            return await apply_cronjobs(client.BatchV1Api(api), namespace,
                                        source_label(config.resolved_pipeline_state_url), wanted)
        except OSError as e:  # aiohttp's connection errors
            raise KubernetesError(f"the Kubernetes API at {api.configuration.host} does not answer: {e}") from e
        finally:
            await api.close()

    return asyncio.run(apply())
