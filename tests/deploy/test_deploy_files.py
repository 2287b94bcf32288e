"""Checks of deploy/: the files parse, agree with each other, and agree with bankd.

Fast and offline. The serve arguments in the Dockerfile, the compose file and the
Kubernetes Deployment are parsed with `bankd serve`'s own argument parser; the metric
names in the dashboard and the alert rules are checked against the metrics a server
exports; promtool (when installed) checks the Prometheus files and runs the alert unit
tests; kubectl (when installed) renders the kustomization; kubernetes-validate checks the
manifests against the Kubernetes schemas; `docker compose config` (or Debian's
docker-compose, both installed by .ci/run when missing) validates the compose file.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bankd.cli import _add_serve
from bankd.serve.metrics import Metrics
from bankd_client.proto import bankd_pb2

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SHARD_OVERLAY = DEPLOY / "k8s-shards" / "shard-0"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "bankd.json"

SERVICE = bankd_pb2.DESCRIPTOR.services_by_name["MemoryBank"].full_name  # bankd.v1.MemoryBank
GRPC_PORT, METRICS_PORT, HEALTH_PORT = 50051, 9100, 50052  # health: plaintext, TLS or not
DASHBOARD_PANELS = (
    "Search latency (p50/p90/p99)",
    "Queries per second",
    "Errors by code",
    "Bank entries",
    "In-flight requests",
    "Process memory",
)
METRIC_NAME = re.compile(r"\b(?:bankd|process|python)_[a-z0-9_]+\b")

YAML_FILES = sorted(p for ext in ("*.yml", "*.yaml") for p in DEPLOY.rglob(ext))


# ---- helpers ----------------------------------------------------------------------


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load(path: Path) -> Any:
    (doc,) = load_docs(path)
    return doc


def parse_serve(argv: list[str]) -> argparse.Namespace:
    """Parse `bankd serve` arguments exactly as the CLI does; SystemExit if it would not."""
    assert argv[0] == "serve", argv
    parser = argparse.ArgumentParser(prog="bankd serve", exit_on_error=False)
    _add_serve(parser)
    return parser.parse_args(argv[1:])


def exported_metric_names() -> set[str]:
    """Sample names a bankd server exports, labelled metrics included before first use."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("_sum", "_count", "_created"),
    }
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in suffixes.get(family.type, ()))
    return names


def k8s_objects() -> dict[tuple[str, str], dict]:
    """(kind, name) -> object for every manifest in deploy/k8s but the kustomization."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in load_docs(path):
            objects[doc["kind"], doc["metadata"]["name"]] = doc
    return objects


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and heredoc bodies skipped."""
    out: list[tuple[str, str]] = []
    lines = iter(path.read_text().splitlines())
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.endswith("\\"):
            nxt = next(lines)
            if not nxt.lstrip().startswith("#"):
                line = line[:-1] + " " + nxt.strip()
        heredoc = re.search(r"<<-?'?\"?(\w+)", line)
        if heredoc:
            for body in lines:
                if body.strip() == heredoc.group(1):
                    break
        word, _, rest = line.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def promtool(*args: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


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


# ---- Prometheus -----------------------------------------------------------------


def test_promtool_check_config() -> None:
    out = promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules() -> None:
    out = promtool("test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_config() -> None:
    config = load(PROMETHEUS / "prometheus.yml")
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = [t for s in jobs["bankd"]["static_configs"] for t in s["targets"]]
    assert targets == [f"bankd:{METRICS_PORT}"]
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS / rule_file).is_file()


def test_alert_rules_use_exported_metrics() -> None:
    exported = exported_metric_names()
    rules = [r for g in load(PROMETHEUS / "alerts.yml")["groups"] for r in g["rules"]]
    names = {r["alert"] for r in rules}
    assert {"BankdSearchLatencyHigh", "BankdErrorRateHigh", "BankdTargetDown"} <= names
    assert "BankdNotReady" in names
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        unknown = set(METRIC_NAME.findall(rule["expr"])) - exported
        assert not unknown, f"{rule['alert']} uses metrics bankd does not export: {unknown}"


# ---- Grafana --------------------------------------------------------------------


def _dashboard_exprs() -> dict[str, list[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return {p["title"]: [t["expr"] for t in p.get("targets", [])] for p in dashboard["panels"]}


def test_dashboard_panels_query_exported_metrics() -> None:
    exported = exported_metric_names()
    panels = _dashboard_exprs()
    for title in DASHBOARD_PANELS:
        assert title in panels, f"dashboard has no panel {title!r}"
        used = {n for e in panels[title] for n in METRIC_NAME.findall(e)}
        assert used & exported, f"{title!r} queries no metric bankd exports"
    for title, exprs in panels.items():
        unknown = {n for e in exprs for n in METRIC_NAME.findall(e)} - exported
        assert not unknown, f"{title!r} uses metrics bankd does not export: {unknown}"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, as a recording rule, with Grafana's variables filled."""
    rules = []
    for title, exprs in _dashboard_exprs().items():
        for expr in exprs:
            expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
            assert "$" not in expr, f"{title!r}: unexpected variable in {expr}"
            rules.append({"record": f"dashboard:query_{len(rules)}", "expr": expr})
    (tmp_path / "dashboard_rules.yml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    out = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


def test_grafana_provisioning_matches_compose() -> None:
    compose = load(DEPLOY / "docker-compose.yml")
    mounts = _bind_mounts(compose["services"]["grafana"])
    provider = load(GRAFANA / "provisioning" / "dashboards" / "bankd.yml")["providers"][0]
    assert mounts[provider["options"]["path"]] == (GRAFANA / "dashboards").resolve()
    (source,) = load(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


# ---- compose and Dockerfile -----------------------------------------------------


def _bind_mounts(service: dict) -> dict[str, Path]:
    """Container path -> host path of the bind mounts that name a relative host path."""
    out = {}
    for volume in service.get("volumes", []):
        host, container = volume.split(":")[:2]
        if host.startswith("."):
            out[container] = (DEPLOY / host).resolve()
    return out


def test_compose_services_and_mounts() -> None:
    compose = load(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert {"bankd", "bankd-gpu", "prometheus", "grafana"} <= services.keys()
    for name, service in services.items():
        for host in _bind_mounts(service).values():
            assert host.exists(), f"{name} mounts missing {host}"
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            assert context == ROOT and (context / build["dockerfile"]).is_file()
    prometheus = _bind_mounts(services["prometheus"])
    for rule_file in load(PROMETHEUS / "prometheus.yml")["rule_files"]:
        assert prometheus[f"/etc/prometheus/{rule_file}"] == PROMETHEUS / rule_file


def _compose_command() -> list[str] | None:
    """`docker compose` (v2) when its plugin is there, else Debian's `docker-compose`."""
    docker = shutil.which("docker")
    if docker:
        version = subprocess.run([docker, "compose", "version"], capture_output=True)
        if version.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    compose_file = DEPLOY / "docker-compose.yml"
    if command[0].endswith("docker-compose"):
        # The Python docker-compose (1.29) validates against the schema it predates the
        # top-level `name` key with; everything else in the file is in that schema.
        text = compose_file.read_text()
        assert re.search(r"^name: bankd$", text, re.MULTILINE)
        compose_file = tmp_path / "docker-compose.yml"  # paths resolve from DEPLOY below
        compose_file.write_text(re.sub(r"^name: bankd\n", "", text, flags=re.MULTILINE))
    result = subprocess.run(
        [*command, "-f", str(compose_file), "--project-directory", str(DEPLOY), "config"],
        capture_output=True,
        text=True,
        cwd=DEPLOY,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert {"bankd", "bankd-gpu", "prometheus", "grafana"} <= rendered["services"].keys()


def test_compose_bankd_services() -> None:
    services = load(DEPLOY / "docker-compose.yml")["services"]
    cpu, gpu = services["bankd"], services["bankd-gpu"]
    assert cpu["profiles"] == ["cpu"] and gpu["profiles"] == ["gpu"]
    for service in (cpu, gpu):
        assert any(v.endswith(":/bank:ro") for v in service["volumes"])
        assert {p.rsplit(":", 1)[-1] for p in service["ports"]} == {"50051", "9100"}
        assert service["healthcheck"]["start_period"]
    # Prometheus scrapes "bankd": the GPU service answers to that name too
    assert "bankd" in gpu["networks"]["default"]["aliases"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert parse_serve(gpu["command"]).device == "cuda"
    assert parse_serve(gpu["command"]).health_port == HEALTH_PORT  # the image's HEALTHCHECK


def test_dockerfile() -> None:
    instructions = dockerfile_instructions(DEPLOY / "Dockerfile")
    words = [w for w, _ in instructions]
    last_stage = len(words) - 1 - words[::-1].index("FROM")
    final = instructions[last_stage:]

    users = [rest for w, rest in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert users[-1].split(":")[0].isdigit(), "numeric USER, so runAsNonRoot can check it"

    exposed = {p for w, rest in final if w == "EXPOSE" for p in rest.split()}
    assert {str(GRPC_PORT), str(METRICS_PORT), str(HEALTH_PORT)} <= exposed

    (healthcheck,) = [rest for w, rest in final if w == "HEALTHCHECK"]
    probe = json.loads(healthcheck[healthcheck.index(" CMD ") + 5 :])  # exec form
    assert probe[:2] == ["python", "-c"]
    assert "grpc_health" in probe[2] and f"service='{SERVICE}'" in probe[2]
    assert f"localhost:{HEALTH_PORT}" in probe[2]  # plaintext: works with TLS on

    (entrypoint,) = [json.loads(rest) for w, rest in final if w == "ENTRYPOINT"]
    (cmd,) = [json.loads(rest) for w, rest in final if w == "CMD"]
    assert entrypoint == ["bankd"]
    args = parse_serve(cmd)
    assert args.host == "0.0.0.0" and args.metrics_host == "0.0.0.0"
    assert args.index == "/bank/bank.faiss"
    assert args.health_port == HEALTH_PORT  # what the HEALTHCHECK asks

    for word, rest in instructions:
        if word == "COPY" and not rest.startswith("--from"):
            *sources, _dest = shlex.split(rest)
            for source in sources:
                assert (ROOT / source).exists(), f"COPY of missing {source}"


@pytest.mark.skipif(sys.version_info < (3, 11), reason="image_requirements.py needs tomllib")
@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_image_requirements(variant: str) -> None:
    """The image installs pyproject's dependencies, torch aside, with the variant's faiss."""
    script, pyproject = DEPLOY / "image_requirements.py", ROOT / "pyproject.toml"
    out = subprocess.run(
        [sys.executable, str(script), str(pyproject), variant],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    names = {re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower() for line in lines}
    assert "torch" not in names
    assert {n for n in names if n.startswith("faiss")} == {f"faiss-{variant}"}
    assert {"grpcio", "grpcio-health-checking", "prometheus-client", "numpy"} <= names
    assert not any(";" in line for line in lines if line.startswith("faiss"))


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
