"""The `bankd` command.

bankd demo-data --out data/shapes --n 2000
bankd build --data data/shapes/data.json --image-folder data/shapes --out bank/bank.faiss
torchrun --nproc_per_node 4 -m bankd build ... [--keep-shards]     # pass 2 on 4 processes
bankd serve --index bank/bank.faiss --port 50051 --metrics-port 9100
bankd import --keys keys.npy --values values.npy [--ids ids.npy] --out bank/bank.faiss
bankd shard --index bank/bank.faiss --shards 4 --out bank/shards/   # one bankd per shard
bankd info  --target localhost:50051
bankd query --target localhost:50051 --image data/shapes/images/00001.png -k 5

TLS and tokens (docs/operations.md, Security): serve takes --tls-cert/--tls-key, --tls-client-ca and
--auth-token-file; info and query take --tls-ca, --tls-cert/--tls-key and --auth-token-file.
"""

from __future__ import annotations

import os

# FAISS's OpenMP threads busy-wait between searches by default; on a machine shared
# with other work that makes searches several times slower, and passive waiting costs
# nothing measurable on an idle one. Must be set before the OpenMP runtime loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json
import logging
import signal
import sys
import threading
from pathlib import Path

import numpy as np

from bankd import __version__
from bankd.serve import flags
from bankd_client import BankClient, BankError, tune_allocator
from bankd_client.credentials import add_connection_flags, connection_options


def _serve(args: argparse.Namespace) -> int:
    from bankd.serve.server import BankServer

    config = flags.from_args(args)
    tune_allocator()
    server = BankServer(config)  # ValueError (exit 2) for bad security flags or files
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if stopping.is_set():
            return
        stopping.set()
        logging.info("signal %d: draining for up to %.0f s", signum, config.grace_s)
        threading.Thread(target=server.stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        server.start()
    except BankError as e:
        print(f"bankd serve: {e}", file=sys.stderr)
        server.stop(grace=0)
        return 2
    print(
        f"bankd serving {args.index} on {args.host}:{server.port} ({server.security.describe()})"
        + (f", metrics on {args.metrics_host}:{server.metrics_port}" if server.metrics_port else "")
        + (f", health on {args.host}:{server.health_port}" if server.health_port else ""),
        flush=True,
    )
    if config.ready_file:
        from bankd.serve.process import write_ready_file

        write_ready_file(
            config.ready_file,
            host=config.host,
            port=server.port,
            metrics_port=server.metrics_port,
            health_port=server.health_port,
            pid=os.getpid(),
            index=str(Path(config.index).resolve()),
        )
    server.wait()
    return 0


def _build(args: argparse.Namespace) -> int:
    from bankd.build.pipeline import run  # torch: only for a build

    return run(args)


def _client(args: argparse.Namespace) -> BankClient:
    return BankClient(args.target, timeout=args.timeout, **connection_options(args))


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="localhost:50051", help="bankd address host:port")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline per call, seconds")
    add_connection_flags(p)


def _info(args: argparse.Namespace) -> int:
    with _client(args) as bank:
        print(json.dumps(bank.info().summary(), indent=2))
    return 0


def _query(args: argparse.Namespace) -> int:
    with _client(args) as bank:
        keys = bank.embed([Path(p) for p in args.image])
        exclude = [args.exclude] * len(keys) if args.exclude else None
        hits = bank.search(keys, k=args.k, exclude_ids=exclude, with_values=True)
    captions = _captions(args.data) if args.data else {}
    for i, path in enumerate(args.image):
        print(f"{path}:")
        for rank, (eid, score) in enumerate(zip(hits.ids[i], hits.scores[i], strict=True), 1):
            v = hits.values[i, rank - 1]
            text = captions.get(int(eid), "")
            norm = float(np.linalg.norm(v.astype(np.float32)))
            shape = "x".join(map(str, v.shape))
            line = f"  {rank}. id={int(eid):<8d} score={float(score):.4f}"
            line += f"  value[{shape}] |v|={norm:.2f}"
            print(line + (f"  {text}" if text else ""))
    return 0


def _captions(path: str) -> dict[int, str]:
    from bankd_client import sample_id_to_int

    out = {}
    for s in json.loads(Path(path).read_text()):
        turns = [t["value"] for t in s.get("conversations", []) if t.get("from") == "gpt"]
        if turns:
            out[sample_id_to_int(s["id"])] = turns[0]
    return out


def build_parser() -> argparse.ArgumentParser:
    # none of these imports torch: serve starts light
    from bankd.build import config as build_config
    from bankd.build import demo_instruct, importer
    from bankd.search import shard

    parser = argparse.ArgumentParser(
        prog="bankd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"bankd {__version__}")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "demo-data", help="generate the synthetic pretraining, instruction and eval data"
    )
    demo_instruct.add_arguments(p)
    p.set_defaults(func=demo_instruct.run)

    p = sub.add_parser(
        "build",
        help="build a bank from LLaVA-format data (data-parallel under torchrun)",
        description="Build a bank. Data-parallel: torchrun --nproc_per_node N -m bankd build "
        "... (each rank encodes its part; rank 0 writes one bank, or --keep-shards one shard "
        "per rank). Run the same command again to resume an interrupted build.",
    )
    build_config.add_arguments(p)
    p.set_defaults(func=_build)

    p = sub.add_parser(
        "import",
        help="make a bank from keys and values you already have (.npy, .safetensors)",
        description=importer.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    importer.add_arguments(p)
    p.set_defaults(func=importer.run)

    p = sub.add_parser("shard", help="split a bank into S banks, one bankd per shard")
    shard.add_arguments(p)
    p.set_defaults(func=shard.run)

    p = sub.add_parser("serve", help="serve a bank over gRPC")
    flags.add_arguments(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("info", help="describe a running bank")
    _add_target(p)
    p.set_defaults(func=_info)

    p = sub.add_parser("query", help="top-k entries for images (embedded by the server)")
    _add_target(p)
    p.add_argument("--image", required=True, nargs="+", help="image file(s)")
    p.add_argument("-k", type=int, default=5, help="hits per image")
    p.add_argument("--exclude", type=int, nargs="*", default=None, help="entry ids to exclude")
    p.add_argument("--data", default=None, help="LLaVA JSON to print the hits' captions from")
    p.set_defaults(func=_query)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Under torchrun (`bankd build`) only rank 0 logs below WARNING; every line says its rank.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    level = logging.getLevelName(args.log_level.upper())
    if rank > 0 and isinstance(level, int):
        level = max(level, logging.WARNING)
    who = f" [rank {rank}]" if world > 1 else ""
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")
    # FAISS's loader reports at INFO each CPU-specific build it tries and does not find.
    logging.getLogger("faiss.loader").setLevel(max(logging.WARNING, logging.root.level))
    try:
        return int(args.func(args) or 0)
    except BankError as e:
        print(f"bankd {args.command}: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as e:
        print(f"bankd {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
