"""Kubernetes manifests: rendered the way kustomize renders them, validated against the
Kubernetes OpenAPI schemas that ``kubernetes-validate`` ships (offline), and checked for what a
schema cannot see (probes, selectors, names that must match, settings the service reads).

The renderer below covers what these kustomizations use (namespace, labels, images, strategic-merge
patches with list merge keys), so that no kustomize binary is needed; when written, its output for
base and overlays/gpu was identical to `kubectl kustomize` (kustomize v5.5.0).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from deploytools import DEPLOY, check_medaudit_args, check_settings, load_yaml

K8S = DEPLOY / "k8s"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
#: Strategic-merge keys of the lists these manifests patch (the rest are replaced whole, as
#: Kubernetes does for e.g. tolerations).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}
#: The oldest Kubernetes these manifests support, and the newest the validator knows.
VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _merge(base: Any, patch: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(base.get(k), v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        mk = MERGE_KEYS[key]
        out_list = [copy.deepcopy(b) for b in base]
        added = []
        for item in patch:
            i = next((n for n, b in enumerate(out_list) if b.get(mk) == item.get(mk)), None)
            if i is None:
                added.append(copy.deepcopy(item))
            else:
                out_list[i] = _merge(out_list[i], item, None)
        return added + out_list  # kustomize puts a patch's new items first
    return copy.deepcopy(patch)


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def render(directory: Path) -> list[dict[str, Any]]:
    """``kustomize build directory``, for the features these kustomizations use."""
    k = load_yaml(directory / "kustomization.yaml")
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "images", "patches"}
    assert set(k) <= known, f"renderer does not implement {set(k) - known}"
    docs: list[dict[str, Any]] = []
    for res in k.get("resources", []):
        path = directory / res
        docs += render(path) if path.is_dir() else _docs(path)
    for patch in k.get("patches", []):
        target = patch["target"]
        (body,) = _docs(directory / patch["path"])
        hits = [d for d in docs if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]]
        assert len(hits) == 1, f"patch {patch['path']} matches {len(hits)} resources"
        docs[docs.index(hits[0])] = _merge(hits[0], body)
    for img in k.get("images", []):
        for d in docs:
            for c in _containers(d):
                if c["image"].split(":")[0] == img["name"]:
                    c["image"] = f"{img.get('newName', img['name'])}:{img['newTag']}"
    for d in docs:
        if "namespace" in k and d["kind"] not in CLUSTER_SCOPED:
            d["metadata"]["namespace"] = k["namespace"]
        for lab in k.get("labels", []):
            d["metadata"].setdefault("labels", {}).update(lab["pairs"])
    return docs


BASE = render(K8S / "base")
GPU = render(K8S / "overlays" / "gpu")


def _get(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    return dict(doc["spec"]["template"]["metadata"]["labels"])


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", ["base", "gpu"])
def test_every_resource_validates_against_the_kubernetes_schema(variant: str, version: str) -> None:
    docs = BASE if variant == "base" else GPU
    assert len(docs) >= 12
    for d in docs:
        kubernetes_validate.validate(d, version, strict=True)


def test_validator_catches_a_bad_manifest() -> None:
    """The validator runs offline on real schemas: a misspelt field fails, not passes."""
    bad = copy.deepcopy(_get(BASE, "Deployment", "medaudit"))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_every_resource_is_namespaced_and_labelled() -> None:
    for d in BASE:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "medaudit", d["metadata"]["name"]
        assert d["metadata"]["labels"]["app.kubernetes.io/part-of"] == "medaudit"


def test_service_deployment_probes_resources_and_scraping() -> None:
    dep = _get(BASE, "Deployment", "medaudit")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["args"][:3] == ["bentoml", "serve", "medaudit.service.api:MedAudit"]
    assert load_yaml(DEPLOY.parent / "bentofile.yaml")["service"] == c["args"][2]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}["http"]
    assert port == 3000 and "--port" in c["args"] and c["args"][c["args"].index("--port") + 1] == "3000"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] in ("/livez", "/readyz")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["port"] == "http"
    annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "3000" and annotations["prometheus.io/path"] == "/metrics"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_every_container_has_requests_and_limits() -> None:
    for doc in [*_workloads(BASE), *_workloads(GPU)]:
        for c in _containers(doc):
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (doc["metadata"]["name"], c["name"])


def test_references_between_resources_resolve() -> None:
    for docs in (BASE, GPU):
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        for doc in _workloads(docs):
            spec = doc["spec"]["template"]["spec"]
            for c in _containers(doc):
                for ref in c.get("envFrom", []):
                    if "configMapRef" in ref:
                        assert ("ConfigMap", ref["configMapRef"]["name"]) in names
                    if "secretRef" in ref:
                        assert ("Secret", ref["secretRef"]["name"]) in names
                volumes = {v["name"] for v in spec.get("volumes", [])}
                claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
                for m in c.get("volumeMounts", []):
                    assert m["name"] in volumes | claims, (doc["metadata"]["name"], m["name"])
            for v in spec.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names
        hpa = _get(docs, "HorizontalPodAutoscaler", "medaudit")
        ref = hpa["spec"]["scaleTargetRef"]
        assert (ref["kind"], ref["name"]) in names
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]


def test_selectors_of_services_and_budgets_match_pods() -> None:
    pods = {d["metadata"]["name"]: d for d in _workloads(BASE)}
    for d in BASE:
        if d["kind"] == "Service":
            sel = d["spec"]["selector"]
        elif d["kind"] == "PodDisruptionBudget":
            sel = d["spec"]["selector"]["matchLabels"]
        else:
            continue
        matched = [w for w in pods.values() if sel.items() <= _pod_labels(w).items()]
        assert matched, f"{d['kind']} {d['metadata']['name']} selects no pods"
        if d["kind"] == "Service":
            ports = {p.get("name") for w in matched for c in _containers(w) for p in c.get("ports", [])}
            for p in d["spec"]["ports"]:
                assert p["targetPort"] in ports, (d["metadata"]["name"], p)
    for w in pods.values():
        assert w["spec"]["selector"]["matchLabels"].items() <= _pod_labels(w).items()
    redis = _get(BASE, "StatefulSet", "redis")
    assert _get(BASE, "Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"


def test_configmap_and_secret_hold_settings_the_service_reads() -> None:
    cm = _get(BASE, "ConfigMap", "medaudit-config")["data"]
    secret = _get(BASE, "Secret", "medaudit-api-keys")["stringData"]
    assert set(secret) == {"MEDAUDIT_API_KEYS", "MEDAUDIT_API_KEY_SALT"}
    assert not {"MEDAUDIT_API_KEYS", "MEDAUDIT_API_KEY_SALT"} & set(cm), "keys belong in the Secret"
    check_settings({k: v for k, v in cm.items() if k.startswith("MEDAUDIT_")})
    assert cm["MEDAUDIT_REDIS_URL"].startswith("redis://redis:")


def test_placeholder_keys_are_refused_at_start() -> None:
    """Applying the example Secret unchanged must not serve with a guessable key."""
    from medaudit.models.errors import ConfigError
    from medaudit.service.config import Settings

    cm = _get(BASE, "ConfigMap", "medaudit-config")["data"]
    secret = _get(BASE, "Secret", "medaudit-api-keys")["stringData"]
    env = {k: v for k, v in {**cm, **secret}.items() if k.startswith("MEDAUDIT_")}
    with pytest.raises(ConfigError, match="MEDAUDIT_API_KEYS"):
        Settings.from_env(env)


def test_worker_runs_a_real_medaudit_command() -> None:
    (c,) = _get(BASE, "Deployment", "medaudit-worker")["spec"]["template"]["spec"]["containers"]
    check_medaudit_args(c["args"])
    assert c["args"][1] == "worker"
    port = c["args"][c["args"].index("--metrics-port") + 1]
    assert {p["name"]: p["containerPort"] for p in c["ports"]}["metrics"] == int(port)
    scrape = load_yaml(DEPLOY / "prometheus" / "prometheus-kubernetes.yml")["scrape_configs"]
    jobs = {j["job_name"]: j["dns_sd_configs"][0] for j in scrape}
    assert set(jobs) == {"medaudit", "medaudit-worker"}
    for job, service in (("medaudit", "medaudit-pods"), ("medaudit-worker", "medaudit-worker")):
        (name,) = jobs[job]["names"]
        assert name == f"{service}.medaudit.svc.cluster.local"
        assert _get(BASE, "Service", service)["spec"]["clusterIP"] == "None"
    assert jobs["medaudit-worker"]["port"] == int(port) and jobs["medaudit"]["port"] == 3000


def test_gpu_overlay_asks_for_a_gpu_and_keeps_the_base() -> None:
    dep = _get(GPU, "Deployment", "medaudit")
    spec = dep["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert spec["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert c["image"] == "medaudit-gpu:0.1.0"
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez", "the patch must merge, not replace"
    assert {e["name"] for e in c["env"]} >= {"OMP_NUM_THREADS", "NVIDIA_VISIBLE_DEVICES"}
    assert _get(GPU, "HorizontalPodAutoscaler", "medaudit")["spec"]["minReplicas"] == 1
    # The worker is the base's, on the same (GPU) image.
    worker = copy.deepcopy(_get(GPU, "Deployment", "medaudit-worker"))
    worker["spec"]["template"]["spec"]["containers"][0]["image"] = "medaudit:0.1.0"
    assert worker == _get(BASE, "Deployment", "medaudit-worker")


def test_strategic_merge_of_the_renderer() -> None:
    base = {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "image": "i"}], "k": 1}
    patch = {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}]}], "k": None, "t": [1]}
    assert _merge(base, patch) == {
        "containers": [
            {"name": "a", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "1"}], "image": "i"}
        ],
        "t": [1],
    }
