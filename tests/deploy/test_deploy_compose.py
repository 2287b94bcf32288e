"""Checks of deploy/'s compose file and container image: the services, their mounts
and their `bankd serve` arguments (parsed by the CLI's own parser), Grafana's
provisioning as compose mounts it, `docker compose config` (or Debian's docker-compose,
both installed by .ci/run when missing), the Dockerfile and the image's requirements.
Fast and offline.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_common import (
    DEPLOY,
    GRAFANA,
    GRPC_PORT,
    HEALTH_PORT,
    METRICS_PORT,
    PROMETHEUS,
    ROOT,
    SERVICE,
    load,
    parse_serve,
)


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


def test_grafana_provisioning_matches_compose() -> None:
    compose = load(DEPLOY / "docker-compose.yml")
    mounts = _bind_mounts(compose["services"]["grafana"])
    provider = load(GRAFANA / "provisioning" / "dashboards" / "bankd.yml")["providers"][0]
    assert mounts[provider["options"]["path"]] == (GRAFANA / "dashboards").resolve()
    (source,) = load(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose["services"]


@pytest.mark.skipif(sys.version_info < (3, 11), reason="image_requirements.py needs tomllib")
def test_cpu_requirements_with_extras_have_no_cuda_build() -> None:
    """`make install CPU_ONLY=1`'s list: the cpu variant plus the test extra."""
    script, pyproject = DEPLOY / "image_requirements.py", ROOT / "pyproject.toml"

    def run(*args: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, str(script), str(pyproject), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    out = run("cpu", "test")
    assert out.returncode == 0, out.stderr
    names = {re.match(r"[A-Za-z0-9_.-]+", line).group(0).lower() for line in out.stdout.split()}
    assert {"faiss-cpu", "pytest", "hypothesis", "numpy"} <= names
    assert "faiss-gpu" not in names and "torch" not in names
    bad = run("cpu", "nonsense")
    assert bad.returncode != 0 and "unknown extras ['nonsense']" in bad.stderr
