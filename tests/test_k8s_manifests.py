"""Kubernetes names, manifests and deploy/: valid for the API server without a cluster.

Every manifest is validated with kubernetes-validate --strict against the oldest and the newest
Kubernetes version the installed package bundles, plus our own checks (quantities, enums, cron).
"""

from __future__ import annotations

import copy
import hashlib
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions
from packaging.version import Version

from jupyter_mlops.errors import ConfigError, ManifestError
from jupyter_mlops.k8s import manifests as m
from jupyter_mlops.k8s.names import label_value, namespace_for, object_name
from jupyter_mlops.kernels.profiles import Profile

ROOT = Path(__file__).parent.parent
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
VERSIONS = sorted(set(all_versions()), key=Version)
EDGE_VERSIONS = [VERSIONS[0], VERSIONS[-1]]  # the oldest and newest schemas bundled

HOSTILE = ["alice; rm -rf /", "../../etc", "$(whoami)", "`id`", "a\nb", "x" * 300, "", "-", "...", "日本語",
           "ÄLICE", "Alice.Smith", "alice_smith", "alice-smith", "ALICE-SMITH", "alice smith", "alice--smith",
           "kube-system", "default", "jupyter-mlops", "deadbeef", "alice-deadbeef", "\x00", "\ud800", "🙂",
           "a" * 63, "a" * 64, "a" * 58, "-alice-", "ǅ", "ﬁle", "straße"]
GPU = Profile("gpu-1", "GPU", cpu=8, memory=32 * 2**30, gpus=2, gpu_type="H100", gpu_resource="nvidia.com/gpu",
              node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
              tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
              priority_class="gpu-high")
SMALL = Profile("small", "Small", cpu=0.5, memory=512 * 2**20)
BARE = Profile("default", "Default (no limits)")


def sha8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def kernel(profile: Profile = GPU, **overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = dict(
        name=object_name("kernel", "3f2a1c4e-0000-4000-8000-1234567890ab"), namespace=namespace_for("Alice.Smith"),
        kernel_id="3f2a1c4e-0000-4000-8000-1234567890ab", user="Alice.Smith", image="ghcr.io/org/pytorch-gpu:2026.11",
        profile=profile, environment="pytorch-gpu", secret_name="kernel-3f2a1c4e-key")
    settings.update(overrides)
    return m.kernel_pod(**settings)


def job(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = dict(
        name="train-3f2a1c4e", namespace="mlops-alice", image="ghcr.io/org/cpu:1",
        command=["jupyter", "mlops", "pipeline", "step", "pipeline.yaml", "train"], env={"PARAM": "$(HOME) 'x'"},
        profile=SMALL, labels={"mlops.jupyter.org/step": "train"}, active_deadline_seconds=3600)
    settings.update(overrides)
    return m.step_job(**settings)


def all_manifests() -> dict[str, dict[str, Any]]:
    return {
        "namespace": m.namespace(namespace_for("alice; rm -rf /"), "alice; rm -rf /"),
        "quota": m.resource_quota("mlops-alice", {"cpu": 16, "memory": "64Gi", "gpus": 2, "pods": 20}),
        "quota-amd": m.resource_quota("mlops-alice", {"cpu": "8500m", "memory": 2**34, "gpus": 1,
                                                      "gpu_resource": "amd.com/gpu"}),
        "limit-range": m.limit_range("mlops-alice", "1", "2Gi"),
        "limit-range-numbers": m.limit_range("mlops-alice", 0.25, 256 * 2**20),
        "secret": m.kernel_secret("kernel-abc-key", "mlops-alice", "0123abcd", m.MANAGED_BY),
        "pod-gpu": kernel(),
        "pod-small": kernel(SMALL, service_account="kernels", environment=None, env={"A": "1"}),
        "pod-bare": kernel(BARE, user="$(whoami)", environment="../../etc", image_pull_policy="Always"),
        "job": job(),
        "job-gpu": job(profile=GPU, backoff_limit=2, service_account="steps"),
        "cronjob": m.schedule_cronjob(name="nightly-train", namespace="mlops-alice", schedule="0 3 * * 1-5",
                                      time_zone="Europe/Berlin", job=job(), starting_deadline_seconds=300),
        "cronjob-macro": m.schedule_cronjob(name="hourly", namespace="mlops-alice", schedule="@hourly",
                                            time_zone=None, job=job(), concurrency_policy="Replace", suspend=True),
    }


def deploy_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((ROOT / "deploy").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((f"{path.name}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return docs


# names ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("user", HOSTILE)
def test_namespace_is_a_dns_label(user: str) -> None:
    for template in ("mlops-{user}", "{user}", "{user}-ns", "x{user}y"):
        name = namespace_for(user, template)
        assert DNS_LABEL.match(name), (user, template, name)
        assert len(name) <= 63


@pytest.mark.parametrize("user", HOSTILE)
def test_label_value_and_object_name_are_valid(user: str) -> None:
    assert LABEL_VALUE.match(label_value(user))
    name = object_name("kernel", user)
    assert DNS_LABEL.match(name) and len(name) <= 63
    short = object_name("sched", user, max_len=52)
    assert DNS_LABEL.match(short) and len(short) <= 52


def test_valid_names_stay_as_they_are() -> None:
    assert namespace_for("alice") == "mlops-alice"
    assert namespace_for("alice-smith") == "mlops-alice-smith"
    assert namespace_for("bob2", "team-{user}-ml") == "team-bob2-ml"
    assert label_value("Alice.Smith") == "Alice.Smith"
    assert label_value("3f2a1c4e-0000-4000-8000-1234567890ab") == "3f2a1c4e-0000-4000-8000-1234567890ab"
    assert label_value("") == ""
    assert object_name("kernel", "3f2a1c4e-0000-4000-8000-1234567890ab") == "kernel-3f2a1c4e-0000-4000-8000-1234567890ab"


def test_changed_names_keep_a_readable_head_and_the_hash_of_the_original() -> None:
    assert namespace_for("Alice.Smith") == f"mlops-alice-smith-{sha8('Alice.Smith')}"
    assert namespace_for("ÄLICE") == f"mlops-alice-{sha8('ÄLICE')}"
    assert namespace_for("straße") == f"mlops-strasse-{sha8('straße')}"
    assert namespace_for("") == f"mlops-{sha8('')}"
    assert namespace_for("日本語") == f"mlops-{sha8('日本語')}"
    assert label_value("alice smith") == f"alice-smith-{sha8('alice smith')}"
    assert label_value("!!!") == sha8("!!!")


def test_names_are_stable() -> None:
    """The same user maps to the same namespace in every process: re-adoption depends on it."""
    assert namespace_for("Alice.Smith") == "mlops-alice-smith-2ece8250"
    assert label_value("alice; rm -rf /") == label_value("alice; rm -rf /")


def test_colliding_inputs_stay_apart() -> None:
    for make in (namespace_for, label_value, lambda u: object_name("kernel", u)):
        names = [make(u) for u in HOSTILE]
        assert len(set(names)) == len(set(HOSTILE)), make
    # a user cannot pick a name that lands on someone else's hashed one
    assert namespace_for(namespace_for("Alice.Smith").removeprefix("mlops-")) != namespace_for("Alice.Smith")
    assert namespace_for("deadbeef") != namespace_for("\x00") and namespace_for("deadbeef").startswith("mlops-deadbeef-")
    assert object_name("a-b", "c!") != object_name("a", "b-c!")


def test_long_names_are_cut_before_the_hash() -> None:
    long = "x" * 300
    assert namespace_for(long) == "mlops-" + "x" * (63 - 6 - 9) + "-" + sha8(long)
    assert len(namespace_for("a" * 57)) == 63 and namespace_for("a" * 57) == "mlops-" + "a" * 57
    assert namespace_for("a" * 58).endswith("-" + sha8("a" * 58))
    assert len(object_name("cron", "y" * 80, max_len=52)) == 52
    with pytest.raises(ValueError):
        object_name("x", max_len=8)


def test_reserved_namespaces_are_never_a_users() -> None:
    for user in ("kube-system", "default", "jupyter-mlops", "kube-public"):
        name = namespace_for(user, "{user}")
        assert name.startswith("u-") and name.endswith(sha8(user)) and DNS_LABEL.match(name)
    assert namespace_for("kube-system") == "mlops-kube-system"


@pytest.mark.parametrize("template", ["mlops", "{user}-{user}", "{name}", "mlops-{user}-{role}", "{user!r}",
                                      "{user:>10}", "MLOPS_{user}", "kube-{user}", "-{user}", "{user}-", "{", "{}", "a" * 60 + "{user}"])
def test_bad_templates_are_config_errors(template: str) -> None:
    with pytest.raises(ConfigError, match="namespace_template"):
        namespace_for("alice", template)


# quantities -----------------------------------------------------------------------------------------------

def test_quantities() -> None:
    assert [m.quantity_cpu(c) for c in (0.5, 2, 2.0, 0.001, 1.25, 16)] == ["500m", "2", "2", "1m", "1250m", "16"]
    assert m.quantity_memory(4 * 2**30) == "4Gi"
    assert m.quantity_memory(512 * 2**20) == "512Mi"
    assert m.quantity_memory(2**40) == "1Ti"
    assert m.quantity_memory(1000) == "1000"
    for bad in (0, -1, 0.0001, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ConfigError, match="cpu"):
            m.quantity_cpu(bad)  # type: ignore[arg-type]
    for bad in (0, -5, 1.5, "4Gi", False):
        with pytest.raises(ConfigError, match="memory"):
            m.quantity_memory(bad)  # type: ignore[arg-type]


# the manifests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("version", EDGE_VERSIONS)
@pytest.mark.parametrize("which", sorted(all_manifests()))
def test_manifests_validate_strictly(which: str, version: str) -> None:
    kubernetes_validate.validate(all_manifests()[which], version, strict=True)


@pytest.mark.parametrize("version", EDGE_VERSIONS)
@pytest.mark.parametrize("which", [name for name, _ in deploy_documents()])
def test_deploy_validates_strictly(which: str, version: str) -> None:
    doc = dict(deploy_documents())[which]
    kubernetes_validate.validate(doc, version, strict=True)
    m.check(doc)


def test_the_schemas_would_catch_a_typo() -> None:
    """The strict validation is not vacuous: an unknown field fails."""
    pod = kernel()
    pod["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, EDGE_VERSIONS[-1], strict=True)


def test_kernel_pod() -> None:
    pod = kernel()
    spec = pod["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "kernel" and container["command"] == m.KERNEL_COMMAND
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == m.KERNEL_PORTS
    assert all(len(p["name"]) <= 15 for p in container["ports"])
    env = {e["name"]: e for e in container["env"]}
    assert env["MLOPS_KERNEL_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "kernel-3f2a1c4e-key", "key": "key"}}
    assert env["MLOPS_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert env["MLOPS_KERNEL_PORTS"]["value"] == '{"shell":52001,"iopub":52002,"stdin":52003,"control":52004,"hb":52005}'
    assert env["MLOPS_KERNEL_PROFILE"]["value"] == "gpu-1"
    assert env["MLOPS_KERNEL_ENVIRONMENT"]["value"] == "pytorch-gpu"
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False and "serviceAccountName" not in spec
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["priorityClassName"] == "gpu-high"
    labels, annotations = pod["metadata"]["labels"], pod["metadata"]["annotations"]
    assert labels["app.kubernetes.io/managed-by"] == "jupyter-mlops"
    assert labels["app.kubernetes.io/component"] == "kernel"
    assert labels[m.LABEL_USER] == "Alice.Smith" and labels[m.LABEL_KERNEL_ID] == "3f2a1c4e-0000-4000-8000-1234567890ab"
    assert labels[m.LABEL_ENVIRONMENT] == "pytorch-gpu" and labels[m.LABEL_PROFILE] == "gpu-1"
    assert annotations == {m.LABEL_USER: "Alice.Smith", m.LABEL_PROFILE: "gpu-1", m.LABEL_ENVIRONMENT: "pytorch-gpu"}


def test_gpu_profile_asks_for_the_extended_resource_with_guaranteed_qos() -> None:
    resources = kernel()["spec"]["containers"][0]["resources"]
    assert resources["limits"] == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert resources["requests"] == resources["limits"]
    amd = Profile("amd", "AMD", gpus=1, gpu_resource="amd.com/gpu")
    assert kernel(amd)["spec"]["containers"][0]["resources"]["limits"] == {"amd.com/gpu": "1"}
    assert kernel(SMALL)["spec"]["containers"][0]["resources"]["limits"] == {"cpu": "500m", "memory": "512Mi"}
    assert kernel(BARE)["spec"]["containers"][0]["resources"] == {}  # the LimitRange's defaults apply
    assert "nvidia.com/gpu" not in str(job()["spec"]["template"]["spec"])
    assert job(profile=GPU)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"


@pytest.mark.parametrize("which", ["pod-gpu", "pod-bare", "job", "cronjob"])
def test_every_pod_is_locked_down(which: str) -> None:
    manifest = all_manifests()[which]
    spec = manifest["spec"]
    spec = {"Pod": lambda: spec, "Job": lambda: spec["template"]["spec"],
            "CronJob": lambda: spec["jobTemplate"]["spec"]["template"]["spec"]}[manifest["kind"]]()
    assert spec["containers"][0]["securityContext"] == {
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False


def test_a_service_account_mounts_its_token() -> None:
    spec = kernel(service_account="kernels")["spec"]
    assert spec["serviceAccountName"] == "kernels" and spec["automountServiceAccountToken"] is True


def test_user_values_are_data_only() -> None:
    """Names sanitised, the original in annotations, `$` escaped from Kubernetes' $(VAR) expansion."""
    hostile = "$(cat /var/run/secrets/token); rm -rf / #"
    pod = kernel(BARE, user=hostile, environment="env\n$(id)", env={"NOTE": hostile})
    (container,) = pod["spec"]["containers"]
    assert container["command"] == m.KERNEL_COMMAND
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["NOTE"] == hostile.replace("$", "$$")
    assert env["MLOPS_KERNEL_ENVIRONMENT"] == "env\n$$(id)"
    assert pod["metadata"]["annotations"][m.LABEL_USER] == hostile
    for value in pod["metadata"]["labels"].values():
        assert LABEL_VALUE.match(value)
    assert job(command=["papermill", "in $(x).ipynb"])["spec"]["template"]["spec"]["containers"][0]["command"][1] \
        == "in $$(x).ipynb"
    with pytest.raises(ConfigError, match="MLOPS_KERNEL_KEY"):
        kernel(env={"MLOPS_KERNEL_KEY": "mine"})
    with pytest.raises(ManifestError, match="metadata.name"):
        kernel(name="Kernel_Alice")  # an unsanitised name never leaves the builder
    with pytest.raises(ManifestError, match=r"metadata.labels\[team\]"):
        job(labels={"team": "a b"})


def test_namespace_quota_and_limit_range() -> None:
    ns = m.namespace(namespace_for("Alice.Smith"), "Alice.Smith")
    assert ns["metadata"]["labels"][m.LABEL_USER] == "Alice.Smith"
    assert ns["metadata"]["annotations"][m.LABEL_USER] == "Alice.Smith"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    hard = all_manifests()["quota"]["spec"]["hard"]
    assert hard == {"requests.cpu": "16", "limits.cpu": "16", "requests.memory": "64Gi", "limits.memory": "64Gi",
                    "requests.nvidia.com/gpu": "2", "pods": "20"}
    assert all_manifests()["quota-amd"]["spec"]["hard"]["requests.amd.com/gpu"] == "1"
    assert m.resource_quota("mlops-a", {"memory": "4GB"})["spec"]["hard"]["limits.memory"] == "4000000000"
    assert m.resource_quota("mlops-a", {})["spec"]["hard"] == {}
    with pytest.raises(ConfigError, match="unknown quota setting 'gpu'"):
        m.resource_quota("mlops-a", {"gpu": 1})
    with pytest.raises(ConfigError, match="gpus"):
        m.resource_quota("mlops-a", {"gpus": 1.5})
    with pytest.raises(ConfigError, match="cpu"):
        m.resource_quota("mlops-a", {"cpu": "lots"})
    (limits,) = all_manifests()["limit-range-numbers"]["spec"]["limits"]
    assert limits == {"type": "Container", "default": {"cpu": "250m", "memory": "256Mi"},
                      "defaultRequest": {"cpu": "250m", "memory": "256Mi"}}


def test_secret_holds_the_key_as_data() -> None:
    secret = all_manifests()["secret"]
    assert secret["type"] == "Opaque" and secret["stringData"] == {"key": "0123abcd"} and secret["immutable"] is True


def test_job_and_cronjob() -> None:
    j = job()
    assert j["spec"]["backoffLimit"] == 0 and j["spec"]["ttlSecondsAfterFinished"] == 3600
    assert j["spec"]["activeDeadlineSeconds"] == 3600
    assert j["metadata"]["labels"]["app.kubernetes.io/component"] == "step"
    assert j["spec"]["template"]["metadata"]["labels"]["mlops.jupyter.org/step"] == "train"
    cron = all_manifests()["cronjob"]["spec"]
    assert cron["schedule"] == "0 3 * * 1-5" and cron["timeZone"] == "Europe/Berlin"
    assert cron["concurrencyPolicy"] == "Forbid" and cron["startingDeadlineSeconds"] == 300
    assert cron["jobTemplate"]["spec"] == j["spec"] and cron["jobTemplate"]["metadata"]["labels"] == j["metadata"]["labels"]
    macro = all_manifests()["cronjob-macro"]["spec"]
    assert macro["schedule"] == "0 * * * *" and macro["timeZone"] == "UTC" and macro["suspend"] is True
    inline = m.schedule_cronjob(name="s", namespace="mlops-a", schedule="CRON_TZ=Asia/Tokyo 30 2 * * *",
                                time_zone=None, job=j)
    assert inline["spec"]["schedule"] == "30 2 * * *" and inline["spec"]["timeZone"] == "Asia/Tokyo"
    assert m.schedule_cronjob(name="s", namespace="mlops-a", schedule="@daily", time_zone="Z",
                              job=j)["spec"]["timeZone"] == "UTC"
    with pytest.raises(ManifestError, match=r"spec.schedule: cron '0 3 \* \*'"):
        m.schedule_cronjob(name="s", namespace="mlops-a", schedule="0 3 * *", time_zone=None, job=j)
    with pytest.raises(ManifestError, match="spec.schedule.*unknown time zone"):
        m.schedule_cronjob(name="s", namespace="mlops-a", schedule="0 3 * * *", time_zone="Mars/Olympus", job=j)
    with pytest.raises(ManifestError, match="metadata.name.*at most 52"):
        m.schedule_cronjob(name="x" * 53, namespace="mlops-a", schedule="@daily", time_zone=None, job=j)


# check() -----------------------------------------------------------------------------------------------------

def broken(which: str, path: str, value: Any) -> dict[str, Any]:
    manifest = copy.deepcopy(all_manifests()[which])
    *parents, last = (part.replace("~", "/") for part in path.split("/"))  # ~ stands for / in a key
    node: Any = manifest
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[int(last) if isinstance(node, list) else last] = value
    return manifest


C = "spec/containers/0"
CRON = "spec/jobTemplate/spec/template/spec/containers/0"


@pytest.mark.parametrize("which, path, value, field", [
    ("pod-gpu", f"{C}/resources/limits/cpu", "2x", r"spec.containers\[0\].resources.limits\[cpu\]"),
    ("pod-gpu", f"{C}/resources/requests/memory", "4 Gi", r"resources.requests\[memory\]"),
    ("pod-gpu", f"{C}/resources/requests/memory", "64Gi", r"resources.requests\[memory\].*above the limit"),
    ("pod-gpu", f"{C}/resources/limits/nvidia.com~gpu", "0.5", r"limits\[nvidia.com/gpu\].*whole number"),
    ("pod-gpu", f"{C}/resources/limits/cpu", "-1", r"limits\[cpu\].*above 0"),
    ("pod-gpu", f"{C}/imagePullPolicy", "Sometimes", r"spec.containers\[0\].imagePullPolicy"),
    ("pod-gpu", f"{C}/image", "img with space", r"spec.containers\[0\].image"),
    ("pod-gpu", f"{C}/ports/0/name", "a-very-long-port-name", r"ports\[0\].name"),
    ("pod-gpu", f"{C}/env/0/name", "1=2", r"env\[0\].name"),
    ("pod-gpu", "spec/restartPolicy", "Sometimes", r"spec.restartPolicy"),
    ("pod-gpu", "spec/tolerations/0/operator", "Maybe", r"spec.tolerations\[0\].operator"),
    ("pod-gpu", "spec/tolerations/0/effect", "NoWay", r"spec.tolerations\[0\].effect"),
    ("pod-gpu", "spec/nodeSelector", {"gpu": "a b"}, r"spec.nodeSelector\[gpu\]"),
    ("pod-gpu", "spec/priorityClassName", "High_Priority", r"spec.priorityClassName"),
    ("pod-gpu", "metadata/namespace", "Mlops.Alice", r"metadata.namespace"),
    ("pod-gpu", "metadata/labels/mlops.jupyter.org~user", "Alice Smith", r"metadata.labels\[mlops.jupyter.org/user\]"),
    ("job", "spec/template/spec/restartPolicy", "Always", r"spec.template.spec.restartPolicy"),
    ("job", "spec/backoffLimit", -1, r"spec.backoffLimit"),
    ("cronjob", "spec/schedule", "61 * * * *", r"spec.schedule.*minute 61"),
    ("cronjob", "spec/schedule", "0 0 * * * *", r"spec.schedule.*6 fields"),
    ("cronjob", "spec/schedule", "CRON_TZ=UTC 0 0 * * *", r"spec.schedule.*spec.timeZone"),
    ("cronjob", "spec/timeZone", "Europe/Berln", r"spec.timeZone.*Europe/Berlin"),
    ("cronjob", "spec/timeZone", "utc", r"spec.timeZone.*write UTC"),
    ("cronjob", "spec/concurrencyPolicy", "Sometimes", r"spec.concurrencyPolicy"),
    ("cronjob", f"{CRON}/resources/limits/memory", "lots", r"spec.jobTemplate.spec.template.spec.containers\[0\]"),
    ("quota", "spec/hard/requests.cpu", "many", r"spec.hard\[requests.cpu\]"),
    ("quota", "spec/hard/requests.nvidia.com~gpu", "1.5", r"spec.hard\[requests.nvidia.com/gpu\]"),
    ("limit-range", "spec/limits/0/default/memory", "2 GB", r"spec.limits\[0\].default\[memory\]"),
    ("limit-range", "spec/limits/0/type", "Node", r"spec.limits\[0\].type"),
    ("namespace", "metadata/name", "x" * 64, r"metadata.name"),
])
def test_check_names_the_field(which: str, path: str, value: Any, field: str) -> None:
    manifest = broken(which, path, value)
    with pytest.raises(ManifestError, match=field) as caught:
        m.check(manifest)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_quantity_parser() -> None:
    from jupyter_mlops.k8s._checks import parse_quantity

    assert parse_quantity("500m") == parse_quantity("0.5") == parse_quantity(".5")
    assert parse_quantity("4Gi") == 4 * 2**30 and parse_quantity("1e3") == 1000 and parse_quantity("1E") == 10**18
    assert parse_quantity("2") == parse_quantity(2) == 2
    for bad in ("", "2x", "4 Gi", "Gi", "1.2.3", "0x10", "1gi", True, None, "1e"):
        assert parse_quantity(bad) is None, bad


# deploy/ -----------------------------------------------------------------------------------------------------

def test_rbac_is_least_privilege() -> None:
    docs = dict(deploy_documents())
    role = docs["rbac.yaml:ClusterRole/jupyter-mlops"]
    granted = {(group, resource): set(rule["verbs"]) for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert not set(rule["verbs"]) & {"escalate", "bind", "impersonate", "deletecollection"}
    assert granted[("", "namespaces")] == {"get", "list", "watch", "create"}
    assert granted[("", "secrets")] == {"get", "create", "delete"}  # no list/watch: cannot enumerate
    assert granted[("", "pods/portforward")] == {"get", "create"}
    assert {resource for _, resource in granted} == {
        "namespaces", "pods", "pods/log", "pods/portforward", "secrets", "resourcequotas", "limitranges",
        "events", "jobs", "cronjobs"}
    assert {group for group, _ in granted} == {"", "batch"}
    binding = docs["rbac.yaml:ClusterRoleBinding/jupyter-mlops"]
    assert binding["roleRef"]["name"] == "jupyter-mlops" and binding["roleRef"]["name"] != "cluster-admin"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "jupyter-mlops", "namespace": "jupyter-mlops"}]
    refs = [doc["roleRef"]["name"] for doc in docs.values() if "roleRef" in doc]
    assert refs == ["jupyter-mlops"]  # one binding, to our role: no cluster-admin, admin or edit
    roles = [name for name, doc in docs.items() if doc["kind"] in ("Role", "ClusterRole")]
    assert roles == ["rbac.yaml:ClusterRole/jupyter-mlops"]
    deployment = docs["server.yaml:Deployment/jupyter-mlops-server"]
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "jupyter-mlops"
