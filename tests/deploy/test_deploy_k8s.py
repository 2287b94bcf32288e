"""Checks of deploy/'s YAML and Kubernetes manifests: every YAML file parses; the
Deployment, Services, Secret template, PVC and PodMonitor agree with each other and with
`bankd serve` (its arguments parsed by the CLI's own parser); kubectl (when installed)
renders the kustomization and the shard overlay; kubernetes-validate checks the
manifests against the Kubernetes schemas. Fast and offline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from deploy_common import (
    DEPLOY,
    GRPC_PORT,
    HEALTH_PORT,
    METRICS_PORT,
    SERVICE,
    load,
    load_docs,
    parse_serve,
)

K8S = DEPLOY / "k8s"
SHARD_OVERLAY = DEPLOY / "k8s-shards" / "shard-0"
YAML_FILES = sorted(p for ext in ("*.yml", "*.yaml") for p in DEPLOY.rglob(ext))


def k8s_objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object for every manifest in deploy/k8s but the kustomization."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_docs(path):
            objects[doc["kind"], doc["metadata"]["name"]] = doc
    return objects


# ---- every YAML file ------------------------------------------------------------


def test_deploy_has_yaml_files() -> None:
    assert len(YAML_FILES) >= 10, YAML_FILES


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} has no document"
    assert all(isinstance(d, dict) for d in docs), f"{path}: a document is not a mapping"


# ---- Kubernetes -----------------------------------------------------------------


def test_k8s_objects_have_identity() -> None:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_docs(path):
            assert doc.get("apiVersion") and doc.get("kind"), path
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), path


def test_kustomization_lists_existing_files() -> None:
    kustomization = load(K8S / "kustomization.yaml")
    resources = kustomization["resources"]
    assert resources
    for name in resources:
        assert (K8S / name).is_file(), f"kustomization lists missing {name}"
    # secret.yaml is a template with empty values: applying it would overwrite real secrets
    assert "secret.yaml" not in resources
    assert {"deployment.yaml", "service.yaml", "configmap.yaml", "pvc.yaml"} <= set(resources)


def _deployment() -> tuple[dict, dict, dict]:
    objects = k8s_objects()
    deployment = objects["Deployment", "bankd"]
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    return deployment, pod, container


def test_deployment_selector_matches_template() -> None:
    deployment, pod, _ = _deployment()
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod["metadata"]["labels"].items()


def test_deployment_container() -> None:
    _, pod, container = _deployment()
    assert container["image"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT, "health": HEALTH_PORT}
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)


def test_deployment_grpc_probes() -> None:
    _, _, container = _deployment()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == HEALTH_PORT, probe
    args = container["args"]
    assert args[args.index("--health-port") + 1] == str(HEALTH_PORT)
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE
    # a large bank loads (and verifies checksums) for minutes before the first SERVING
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600


def test_deployment_args_are_valid_serve_flags() -> None:
    """$(VAR)s resolve to ConfigMap keys, and `bankd serve`'s parser accepts the result."""
    objects = k8s_objects()
    _, pod, container = _deployment()
    (source,) = container["envFrom"]
    config = objects["ConfigMap", source["configMapRef"]["name"]]["data"]
    assert all(isinstance(v, str) for v in config.values()), "ConfigMap values must be strings"

    def resolve(arg: str) -> str:
        def var(m: re.Match) -> str:
            assert m.group(1) in config, f"$({m.group(1)}) is not in the ConfigMap"
            return config[m.group(1)]

        return re.sub(r"\$\((\w+)\)", var, arg)

    args = parse_serve([resolve(a) for a in container["args"]])
    assert (args.host, args.port) == ("0.0.0.0", GRPC_PORT)
    assert (args.metrics_host, args.metrics_port) == ("0.0.0.0", METRICS_PORT)
    assert args.index.startswith("/bank/")
    assert args.grace < pod["spec"]["terminationGracePeriodSeconds"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["bank"]["mountPath"] == "/bank" and mounts["bank"]["readOnly"] is True


def test_deployment_volumes_refer_to_manifests() -> None:
    objects = k8s_objects()
    _, pod, _ = _deployment()
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["bank"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objects
    secrets = {s["secret"]["name"] for s in volumes["secrets"]["projected"]["sources"]}
    for name in secrets:
        assert ("Secret", name) in objects, f"secret.yaml does not describe {name}"


def test_services() -> None:
    objects = k8s_objects()
    _, pod, _ = _deployment()
    labels = pod["metadata"]["labels"]
    service = objects["Service", "bankd"]["spec"]
    headless = objects["Service", "bankd-headless"]["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == {
        "grpc": GRPC_PORT,
        "metrics": METRICS_PORT,
    }
    assert headless["clusterIP"] == "None"
    assert {p["name"]: p["port"] for p in headless["ports"]} == {"grpc": GRPC_PORT}
    for spec in (service, headless):
        assert spec["selector"].items() <= labels.items()


def test_headless_service_resolves_to_the_ready_bankd_pods() -> None:
    """What clients balance over (dns:///bankd-headless...:50051, round_robin): one
    address per ready bankd pod, on its gRPC port."""
    objects = k8s_objects()
    deployment, _, container = _deployment()
    headless = objects["Service", "bankd-headless"]["spec"]
    # The Deployment's own selector: exactly its pods (its rollouts' too), nothing else.
    assert headless["selector"] == deployment["spec"]["selector"]["matchLabels"]
    # Pods loading or draining (readiness NOT_SERVING) are left out of the DNS answer.
    assert headless.get("publishNotReadyAddresses", False) is False
    (port,) = headless["ports"]
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named[port["targetPort"]] == port["port"] == GRPC_PORT
    assert port["appProtocol"] == "kubernetes.io/h2c"  # plaintext HTTP/2: gRPC


def test_secret_template_holds_no_secret() -> None:
    objects = k8s_objects()
    keys = {}
    for (kind, name), doc in objects.items():
        if kind == "Secret":
            assert "data" not in doc, f"{name}: only empty stringData belongs in git"
            assert all(v == "" for v in doc["stringData"].values()), f"{name} holds a value"
            keys.update(dict.fromkeys(doc["stringData"], name))
    assert {"tls.crt", "tls.key", "ca.crt", "token"} <= keys.keys()
    assert objects["Secret", keys["tls.crt"]]["type"] == "kubernetes.io/tls"


def test_pvc_and_podmonitor() -> None:
    objects = k8s_objects()
    _, pod, _ = _deployment()
    pvc = objects["PersistentVolumeClaim", "bankd-bank"]["spec"]
    assert pvc["accessModes"] and pvc["resources"]["requests"]["storage"]
    monitor = objects["PodMonitor", "bankd"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["podMetricsEndpoints"]] == ["metrics"]
    # the alert rules select job="bankd": the job is taken from this pod label
    assert pod["metadata"]["labels"][monitor["jobLabel"]] == "bankd"


def test_kustomize_renders() -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Service", "Service"]


def test_shard_overlay_renders_a_shard_of_its_own() -> None:
    """k8s-shards/shard-0: deploy/k8s renamed and relabelled for shard 0 of a split
    bank, with a headless Service that selects that shard's pods only."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(
        ["kubectl", "kustomize", str(SHARD_OVERLAY)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert set(objects) == {
        ("ConfigMap", "bankd-config-shard-0"),
        ("Deployment", "bankd-shard-0"),
        ("PersistentVolumeClaim", "bankd-bank-shard-0"),
        ("Service", "bankd-shard-0"),
        ("Service", "bankd-headless-shard-0"),
    }
    deployment = objects["Deployment", "bankd-shard-0"]
    pod = deployment["spec"]["template"]
    shard = {"bankd.io/shard": "0"}
    assert shard.items() <= deployment["spec"]["selector"]["matchLabels"].items()
    assert shard.items() <= pod["metadata"]["labels"].items()
    for name in ("bankd-shard-0", "bankd-headless-shard-0"):
        selector = objects["Service", name]["spec"]["selector"]
        assert shard.items() <= selector.items() <= pod["metadata"]["labels"].items(), name
    assert objects["Service", "bankd-headless-shard-0"]["spec"]["clusterIP"] == "None"
    (container,) = pod["spec"]["containers"]
    (source,) = container["envFrom"]
    config = objects["ConfigMap", source["configMapRef"]["name"]]["data"]
    assert re.fullmatch(r"/bank/bank-0-of-\d+\.faiss", config["BANKD_INDEX"])
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["bank"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objects
    validator = pytest.importorskip("kubernetes_validate")
    for doc in docs:
        validator.validate(doc, "1.27.0", strict=True)


def test_manifests_match_kubernetes_schemas() -> None:
    validator = pytest.importorskip("kubernetes_validate")
    for doc in k8s_objects().values():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: not in the Kubernetes schemas
        # 1.27: the first release with the gRPC probe on by default (GA)
        validator.validate(doc, "1.27.0", strict=True)


def test_deployment_security_args_match_the_mounted_secrets() -> None:
    """The commented TLS/auth arguments parse as `bankd serve` flags once uncommented,
    and each file they name is a key of a secret mounted at that folder."""
    objects = k8s_objects()
    _, pod, container = _deployment()
    text = (K8S / "deployment.yaml").read_text()
    commented = re.findall(r"^\s*# - (--(?:tls|auth)[\w-]*|/etc/bankd/secrets/\S+)", text, re.M)
    args = parse_serve(["serve", "--index", "/bank/bank.faiss", *commented])
    files = [args.tls_cert, args.tls_key, args.tls_client_ca, args.auth_token_file]
    assert all(files), commented
    mount = {m["name"]: m for m in container["volumeMounts"]}["secrets"]["mountPath"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    keys = {
        key
        for source in volumes["secrets"]["projected"]["sources"]
        for key in objects["Secret", source["secret"]["name"]]["stringData"]
    }
    for path in files:
        folder, _, key = path.rpartition("/")
        assert folder == mount and key in keys, path
