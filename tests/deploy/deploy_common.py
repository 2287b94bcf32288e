"""What the checks of deploy/ share: its folders, the ports the files must agree on,
a YAML reader, and `bankd serve`'s own argument parser. Imported by the test modules
next to it (their folder is on the path).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml

from bankd.serve.flags import add_arguments as add_serve_arguments
from bankd_client.proto import bankd_pb2

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"

SERVICE = bankd_pb2.DESCRIPTOR.services_by_name["MemoryBank"].full_name  # bankd.v1.MemoryBank
GRPC_PORT, METRICS_PORT, HEALTH_PORT = 50051, 9100, 50052  # health: plaintext, TLS or not


def load_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def load(path: Path) -> Any:
    (doc,) = load_docs(path)
    return doc


def parse_serve(argv: list[str]) -> argparse.Namespace:
    """Parse `bankd serve` arguments exactly as the CLI does; SystemExit if it would not."""
    assert argv[0] == "serve", argv
    parser = argparse.ArgumentParser(prog="bankd serve", exit_on_error=False)
    add_serve_arguments(parser)
    return parser.parse_args(argv[1:])
