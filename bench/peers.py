"""bankd against Milvus Lite and Chroma on the same bank, values returned, with recall.

    pip install -e ".[peers]"                      # pymilvus + milvus-lite, chromadb
    python bench/peers.py                          # N=100000, d=768, B=128, k=5
    python bench/peers.py --n 20000                # quick check, a few minutes
    python bench/peers.py --peers chroma --json peers.json
    python bench/peers.py --workdir /tmp/bench-bank   # keep the banks, reused next run

It writes `bench/search_latency.py`'s synthetic bank twice (same keys, values and ids:
a Flat index and an HNSW32 one) and queries near bank keys, then measures, one system
after another, `--warmup` + `--repeats` batches of B queries, top-k with each hit's
fp16 [32, 96] value returned and decoded to a (B, k, 32, 96) array:

* bankd: `bankd serve` in a child process (search_latency's server child) on the Flat
  bank and on the HNSW32 bank, `BankClient.search(..., with_values=True)`: the values
  through shared memory (the server is on this host), and, batch by batch in turn,
  in the response message as a client on another host gets them;
* each peer in a child process of its own (`bench/peer_backends.py`), which loads the
  keys and values into the peer's store in a temporary folder (timed, in batches) and
  then searches in process, as Milvus Lite and Chroma's local clients run;
* in-process FAISS Flat search + numpy gather (the exact answer every recall is
  measured against) and in-process FAISS HNSW at bankd's efSearch, for reference.

bankd's efSearch is the smallest of a ladder whose recall@k on the measured queries is
at least that of the faster HNSW peer, the one the ratio divides by (`--ef-search`
fixes it); bankd gets it per request (`BankClient.search(..., ef_search=ef)`), the
in-process reference as the index's efSearch.

The last two lines are the ratios of median latencies,
`ratio(milvus_flat/bankd_flat) = X.XX` and `ratio(min(milvus_hnsw, chroma_hnsw)/bankd_hnsw)
= X.XX`, with each side's recall. `--json PATH` writes every figure. Progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

# Passive OpenMP waiting in this process and the peers' (`bankd serve` sets it for
# itself): spinning threads on a shared machine slow every search several-fold.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_backends as pb  # noqa: E402  (the peers)
import search_latency as sl  # noqa: E402  (the bank, queries and server child)

from bankd.store.paths import BankPaths  # noqa: E402
from bankd.store.reader import Bank  # noqa: E402

HNSW_FACTORY = "HNSW32"
EF_LADDER = (16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128, 160, 192, 256, 384, 512)
DEFAULT_EF_SEARCH = 64  # bankd's efSearch when no HNSW peer ran and none is given
PEER_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class PeersConfig(sl.BenchConfig):
    """What one run measures: search_latency's workload (its `index`, `merge_wait_us` and
    `threads` keep their defaults) and the peers; saved with the figures."""

    peers: tuple[str, ...] = ("milvus", "chroma")
    peer_ef: int = 64  # efSearch of the HNSW peers
    ef_search: int = 0  # bankd's; 0: tuned to the recall of the faster HNSW peer

    def bank(self, index: str = "Flat") -> sl.BenchConfig:
        """The search_latency config that writes the same bank and queries."""
        own = {f.name: getattr(self, f.name) for f in fields(sl.BenchConfig)}
        return sl.BenchConfig(**{**own, "index": index})


def recall(got: np.ndarray, truth: np.ndarray) -> float:
    """Mean over query rows of |got ∩ truth| / k; both (Q, k) entry ids."""
    hits = [len(np.intersect1d(g[g >= 0], t)) for g, t in zip(got, truth, strict=True)]
    return float(np.mean(hits) / truth.shape[1])


def value_mismatches(bank: Bank, ids: np.ndarray, values: np.ndarray) -> int:
    """Hits whose returned value is not the bank's value of that entry."""
    rows = bank.rows_of(ids.reshape(-1))
    want = bank.values[np.maximum(rows, 0)].reshape(values.shape)
    same = (want == values).all(axis=(2, 3)).reshape(-1) & (rows >= 0)
    return int((~same).sum())


# -- the banks and bankd -------------------------------------------------------------


def banks_for(cfg: PeersConfig, workdir: Path) -> tuple[Path, Path, dict[str, float | None]]:
    """The Flat bank (workdir/bank.faiss, shared with search_latency.py) and the HNSW32
    one (workdir/hnsw32/bank.faiss), with the seconds each took to write (None: reused)."""
    (workdir / "hnsw32").mkdir(parents=True, exist_ok=True)
    paths, write_s = [], {}
    for index, where in (("Flat", workdir), (HNSW_FACTORY, workdir / "hnsw32")):
        manifest = BankPaths(where / "bank.faiss").manifest
        before = manifest.stat().st_mtime_ns if manifest.exists() else None
        t0 = time.perf_counter()
        paths.append(sl.bank_for(cfg.bank(index), where))
        write_s[index] = None if before == manifest.stat().st_mtime_ns else time.perf_counter() - t0
    return paths[0], paths[1], write_s


def measure_bankd(
    label: str,
    index_path: Path,
    cfg: PeersConfig,
    batches: list[np.ndarray],
    workdir: Path,
    search_kwargs: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """bankd serve on index_path in a child process; BankClient.search with values,
    through shared memory and in the message, batch by batch in alternating order."""
    from bankd_client import BankClient

    bank = Bank.load(index_path, verify=False, load_index=False)
    sl.progress(f"bankd {label}: starting the server process")
    t0 = time.perf_counter()
    server = sl.ServerProcess(index_path, workdir / f"server-{label}.log", cfg.bank())
    target = f"127.0.0.1:{server.port}"
    sides = ("shared_memory", "message")
    times: dict[str, list] = {side: [] for side in sides}
    ids: dict[str, list] = {side: [] for side in sides}
    wrong = dict.fromkeys(sides, 0)
    try:
        with (
            BankClient(target, timeout=600) as client,
            BankClient(target, timeout=600, shared_memory=False) as by_message,
        ):
            client.wait_ready(timeout=sl.SERVER_START_S)
            start_s = time.perf_counter() - t0
            clients = {"shared_memory": client, "message": by_message}
            for i, queries in enumerate(batches):
                for side in sides[::-1] if i % 2 else sides:
                    search = clients[side].search
                    hits, t = sl._timed(
                        lambda q=queries, f=search: f(q, k=cfg.k, with_values=True, **search_kwargs)
                    )
                    wrong[side] += value_mismatches(bank, hits.ids, hits.values)
                    if i >= cfg.warmup:
                        times[side].append(t)
                        ids[side].append(hits.ids)
            if client.shared_memory_in_use is not True:
                sl.progress(f"bankd {label}: shared memory was not used")
            memory = sl.memory_mb(server.proc.pid)
    finally:
        server.stop()
    out = tuple(
        {
            "times": times[side],
            "ids": np.concatenate(ids[side]),
            "start_s": start_s,
            "memory": memory,
            "value_mismatches": wrong[side],
        }
        for side in sides
    )
    sl.progress(
        f"bankd {label}: median {np.median(times['shared_memory']) * 1e3:.1f} ms, values in "
        f"the message {np.median(times['message']) * 1e3:.1f} ms"
    )
    return out


def in_process(
    index_path: Path, batches: list[np.ndarray], k: int, warmup: int, ef: int | None = None
) -> tuple[list[float], np.ndarray]:
    """In-process FAISS search + numpy gather (search_latency's reference): seconds and
    entry ids (Q, k) of the batches after the warm-up ones."""
    ref = sl.Reference(index_path)
    if ef is not None:
        faiss.downcast_index(ref.index).hnsw.efSearch = ef
    times, ids = [], []
    for i, queries in enumerate(batches):
        (out, _), t = sl._timed(lambda q=queries: ref.search(q, k))
        if i >= warmup:
            times.append(t)
            ids.append(out["ids"])
    return times, np.concatenate(ids)


def tune_ef_search(index_path: Path, queries: np.ndarray, truth: np.ndarray, target: float) -> int:
    """The smallest efSearch of EF_LADDER whose recall on the queries reaches target."""
    index = faiss.read_index(str(index_path))
    ids = Bank.load(index_path, verify=False, load_index=False).ids
    for ef in EF_LADDER:
        faiss.downcast_index(index).hnsw.efSearch = ef
        _, rows = index.search(queries, truth.shape[1])
        got = recall(np.where(rows >= 0, ids[np.maximum(rows, 0)], -1), truth)
        sl.progress(f"  efSearch {ef}: recall {got:.4f} (target {target:.4f})")
        if got >= target:
            return ef
    sl.progress(f"  no efSearch up to {EF_LADDER[-1]} reaches the target; using it")
    return EF_LADDER[-1]


# -- the peers, each in a child process ----------------------------------------------


def peer_child(job_path: str) -> int:
    """Child process: load the bank into one peer, search it, write the figures as JSON."""
    job = json.loads(Path(job_path).read_text())
    cfg = PeersConfig(**{**job["config"], "peers": tuple(job["config"]["peers"])})
    name, index_path = job["peer"], Path(job["index"])
    bank = Bank.load(index_path, verify=False, load_index=False)
    batches = sl.make_queries(cfg.bank(), index_path)
    _, make = pb.PEERS[name]
    with tempfile.TemporaryDirectory(prefix=f"bankd-peer-{name}-") as folder:
        peer = make(Path(folder), cfg.peer_ef)
        before = sl.memory_mb(os.getpid())
        sl.progress(f"{name}: loading {cfg.n} entries into {folder}")
        _, load_s = sl._timed(lambda: peer.load(bank.keys, bank.values, bank.ids))
        loaded = sl.memory_mb(os.getpid())
        sl.progress(f"{name}: loaded in {load_s:.1f} s; searching")
        times, search_s, ids, wrong = [], [], [], 0
        for i, queries in enumerate(batches):
            t0 = time.perf_counter()
            rows = peer.search(queries, cfg.k)
            t1 = time.perf_counter()
            got, values = pb.decode_hits(rows, cfg.k)  # (B, k), (B, k, 32, 96) fp16
            t2 = time.perf_counter()
            wrong += value_mismatches(bank, got, values)
            if i >= cfg.warmup:
                times.append(t2 - t0)
                search_s.append(t1 - t0)
                ids.append(got.tolist())
        after = sl.memory_mb(os.getpid())
        peer.close()
    result = {
        "times": times,
        "search_times": search_s,
        "ids": [row for batch in ids for row in batch],
        "load_s": load_s,
        "memory": {"before_load": before, "after_load": loaded, "after_search": after},
        "value_mismatches": wrong,
    }
    Path(job["result"]).write_text(json.dumps(result))
    return 0


def run_peer(name: str, cfg: PeersConfig, index_path: Path, workdir: Path) -> dict | str:
    """One peer in a child process: its figures, or why it was skipped."""
    module, _ = pb.PEERS[name]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not installed (pip install -e '.[peers]')"
    job, result = workdir / f"peer-{name}.job.json", workdir / f"peer-{name}.json"
    result.unlink(missing_ok=True)
    job.write_text(
        json.dumps(
            {"config": asdict(cfg), "peer": name, "index": str(index_path), "result": str(result)}
        )
    )
    sl.progress(f"{name}: starting its process")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--peer-child", str(job)]
    with open(workdir / f"peer-{name}.log", "wb") as log:
        try:
            rc = subprocess.run(cmd, stderr=log, timeout=PEER_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            return f"no answer in {PEER_TIMEOUT_S:.0f} s"
    if rc != 0 or not result.exists():
        tail = (workdir / f"peer-{name}.log").read_text(errors="replace").strip()
        return f"its process failed (exit {rc}): {tail.splitlines()[-1] if tail else ''}"
    out = json.loads(result.read_text())
    out["ids"] = np.asarray(out["ids"], dtype=np.int64)
    sl.progress(f"{name}: median {np.median(out['times']) * 1e3:.1f} ms")
    return out


# -- the run -------------------------------------------------------------------------

HNSW_PEERS = ("milvus_hnsw", "chroma_hnsw")


def measure(cfg: PeersConfig, workdir: Path) -> dict[str, Any]:
    flat, hnsw, write_s = banks_for(cfg, workdir)
    batches = sl.make_queries(cfg.bank(), flat)
    measured = np.concatenate(batches[cfg.warmup :])
    systems: dict[str, dict[str, Any]] = {}

    def done(name: str, figures: dict[str, Any]) -> None:
        figures["load_average"] = os.getloadavg()[0]  # the machine's, as it was measured
        systems[name] = figures

    sl.progress("in-process FAISS Flat: the exact answers")
    times, truth = in_process(flat, batches, cfg.k, cfg.warmup)
    done("faiss_flat", {"times": times, "ids": truth})
    shared, message = measure_bankd("flat", flat, cfg, batches, workdir, {})
    done("bankd_flat", shared)
    done("bankd_flat_message", message)
    skipped: dict[str, str] = {}
    for group in cfg.peers:
        for name in pb.PEER_GROUPS[group]:
            out = run_peer(name, cfg, flat, workdir)
            if isinstance(out, str):
                skipped[name] = out
                sl.progress(f"skipped {name}: {out}")
            else:
                done(name, out)
    ef = cfg.ef_search
    measured_peers = [n for n in HNSW_PEERS if n in systems]
    if not ef and measured_peers:
        fastest = min(measured_peers, key=lambda n: float(np.median(systems[n]["times"])))
        target = recall(systems[fastest]["ids"], truth)
        sl.progress(f"tuning bankd's efSearch to recall {target:.4f} ({fastest}'s, the faster)")
        ef = tune_ef_search(hnsw, measured, truth, target)
    ef = ef or DEFAULT_EF_SEARCH
    times, ids = in_process(hnsw, batches, cfg.k, cfg.warmup, ef=ef)
    done("faiss_hnsw", {"times": times, "ids": ids})
    shared, message = measure_bankd("hnsw", hnsw, cfg, batches, workdir, {"ef_search": ef})
    done("bankd_hnsw", shared)
    done("bankd_hnsw_message", message)
    for r in systems.values():
        r["recall"] = recall(r.pop("ids"), truth)
        r.update(sl._stats(r.pop("times")))
        if "search_times" in r:
            r["search_median_ms"] = sl._stats(r.pop("search_times"))["median_ms"]
    return {
        "systems": systems,
        "skipped": skipped,
        "bankd_ef_search": ef,
        "bank_write_s": write_s,
        "ratios": ratios(systems),
    }


def ratios(systems: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def median(name: str) -> float | None:
        return systems[name]["median_ms"] if name in systems else None

    peer_flat = median("milvus_flat")
    hnsw_peers = [m for m in map(median, HNSW_PEERS) if m is not None]
    out = {}
    for suffix in ("", "_message"):
        flat, hnsw = median(f"bankd_flat{suffix}"), median(f"bankd_hnsw{suffix}")
        out[f"milvus_flat/bankd_flat{suffix}"] = peer_flat / flat if peer_flat else None
        out[f"min(milvus_hnsw, chroma_hnsw)/bankd_hnsw{suffix}"] = (
            min(hnsw_peers) / hnsw if hnsw_peers else None
        )
    return out


LABELS = {
    "faiss_flat": ("in-process faiss + numpy gather", "Flat"),
    "faiss_hnsw": ("in-process faiss + numpy gather", "HNSW32 ef={ef}"),
    "bankd_flat": ("bankd Search RPC, shared memory", "Flat"),
    "bankd_flat_message": ("bankd Search RPC, in the message", "Flat"),
    "bankd_hnsw": ("bankd Search RPC, shared memory", "HNSW32 ef={ef}"),
    "bankd_hnsw_message": ("bankd Search RPC, in the message", "HNSW32 ef={ef}"),
    "milvus_flat": ("Milvus Lite (in process)", "FLAT"),
    "milvus_hnsw": ("Milvus Lite (in process)", "HNSW M=32 ef={peer_ef}"),
    "chroma_hnsw": ("Chroma (in process)", "HNSW M=32 ef={peer_ef}"),
}


def _memory(r: dict[str, Any]) -> str:
    m = r.get("memory") or {}
    if "after_search" in m:  # a peer: what loading and searching added to its process
        added = m["after_search"].get("VmRSS", 0) - m["before_load"].get("VmRSS", 0)
        return f"+{added:.0f} ({m['after_search'].get('VmHWM', 0):.0f})"
    return f"{m['VmRSS']:.0f} ({m['VmHWM']:.0f})" if m else ""


def report(cfg: PeersConfig, r: dict[str, Any]) -> str:
    s, ef = r["systems"], r["bankd_ef_search"]
    lines = [
        f"peers: N={cfg.n} d={cfg.d} B={cfg.batch} k={cfg.k}, values [32, 96] fp16 returned "
        f"and decoded ({cfg.repeats} batches measured after {cfg.warmup} warm-up)",
        f"  {'system':<34s} {'index':<22s} {'median ms':>9s} {'p90 ms':>8s} "
        f"{f'recall@{cfg.k}':>9s} {'load s':>7s} {'wrong':>5s} {'loadavg':>7s}  RSS MB (peak)",
    ]
    for name, (system, index) in LABELS.items():
        if name not in s:
            continue
        x = s[name]
        load = x.get("load_s", x.get("start_s"))
        lines.append(
            f"  {system:<34s} {index.format(ef=ef, peer_ef=cfg.peer_ef):<22s} "
            f"{x['median_ms']:9.1f} {x['p90_ms']:8.1f} {x['recall']:9.4f} "
            f"{'' if load is None else f'{load:7.1f}':>7s} {x.get('value_mismatches', ''):>5} "
            f"{x['load_average']:7.2f}  {_memory(x)}"
        )
    for name, why in r["skipped"].items():
        lines.append(f"  skipped {name}: {why}")
    lines += [
        "  load s: peers, inserting keys + values and building the index; bankd, server start "
        "to SERVING on a written bank (bank written in "
        + ", ".join(
            f"{k} {'reused' if v is None else f'{v:.1f} s'}" for k, v in r["bank_write_s"].items()
        )
        + "); wrong: hits whose decoded value is not the entry's; loadavg: the machine's "
        "1-minute load average after the system was measured",
        "  RSS MB: bankd, the server process; peers, what loading and searching added to "
        "their process (+), with its peak",
    ]
    pairs = [(("milvus_flat",), "bankd_flat"), (HNSW_PEERS, "bankd_hnsw")]
    pairs = [(peer, f"{ours}_message") for peer, ours in pairs] + pairs  # the last two: ours
    ordered = sorted(r["ratios"].items(), key=lambda kv: not kv[0].endswith("_message"))
    for (key, value), (peer, ours) in zip(ordered, pairs, strict=True):
        recalls = ", ".join(f"{p} {s[p]['recall']:.4f}" for p in peer if p in s)
        text = "n/a" if value is None else f"{value:.2f}"
        lines.append(
            f"ratio({key}) = {text} (recall@{cfg.k}: {recalls}; {ours} {s[ours]['recall']:.4f})"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[PeersConfig, str | None]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = PeersConfig()
    sl.add_workload_args(p, d)
    p.add_argument(
        "--peers", default=",".join(d.peers), help=f"comma list of {', '.join(pb.PEER_GROUPS)}"
    )
    p.add_argument("--peer-ef", type=int, default=d.peer_ef, help="efSearch of the HNSW peers")
    p.add_argument(
        "--ef-search",
        type=int,
        default=d.ef_search,
        help="bankd's efSearch (default: tuned to the recall of the faster HNSW peer)",
    )
    p.add_argument("--workdir", default=None, help="keep the banks here (reused if they match)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--peer-child", default=None, help=argparse.SUPPRESS)  # a peer's process
    a = p.parse_args(argv)
    peers = tuple(x for x in a.peers.split(",") if x)
    if unknown := set(peers) - set(pb.PEER_GROUPS):
        p.error(f"unknown peers {sorted(unknown)} (choose from {', '.join(pb.PEER_GROUPS)})")
    positive = (a.n, a.d, a.batch, a.k, a.repeats, a.clusters, a.peer_ef)
    if min(positive) < 1 or a.warmup < 0 or a.ef_search < 0 or a.k > a.n:
        p.error("n, d, batch, k, repeats, clusters, peer-ef must be positive; k <= n")
    values = {f.name: getattr(a, f.name, getattr(d, f.name)) for f in fields(PeersConfig)}
    values["peers"] = peers
    return PeersConfig(**values), a.peer_child


def main(argv: list[str] | None = None) -> int:
    cfg, job = parse_args(argv)
    if job is not None:
        return peer_child(job)
    sl.progress(f"config: {asdict(cfg)}")
    with sl.workdir_for(cfg.workdir, "bankd-peers-") as workdir:
        results = measure(cfg, workdir)
    sl.publish(report(cfg, results), cfg, results)
    return 0


if __name__ == "__main__":
    sl.run_program(main)  # child processes stop on the way out, even when interrupted
