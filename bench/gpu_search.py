"""GPU search against the GPU's own limits: bankd's Searcher and a bankd server on CUDA.

    python bench/gpu_search.py                        # N=1000000, d=1152, B=1024, k=5,100,2048
    python bench/gpu_search.py --n 200000 --k 5       # quicker
    python bench/gpu_search.py --no-server --json gpu_search.json

Needs a CUDA device. It writes a synthetic bank (``bench/search_latency.py``'s generator
through ``bankd.store.BankWriter``: clustered unit keys, random fp16 values [N, 32, 96],
a Flat index) to a temporary folder, and then, in one run:

1. the limits of this GPU, measured on the bank's own fp16 key matrix: a device-to-device
   copy of it (memory bandwidth, bytes read + written) and a read of it (a sum), and the
   fp16 matrix product of the search's shape, (B x d) @ (d x N), plus a square 8192^3 one
   (matrix-multiply throughput, TFLOP/s);
2. ``bankd.search.index.Searcher`` on CUDA (the torch path when FAISS has no GPU build), each
   query excluding its own entry (k + 1 fetched): the GPU work alone (queries already on
   the device, CUDA-synchronised), ``raw_search`` (with the copies to and from the host)
   and ``search`` (with the exclusion filter), checked against a float64 brute force;
3. variants of the torch path, GPU work alone: plain top-k per block instead of the group
   pre-selection, other block sizes, and the previous code (one (B, N) score matrix);
4. ``bankd serve --device cuda`` in a child process and ``BankClient.search`` over
   loopback, with values when the response fits ``--max-message-mb``, and without.

Times are medians over ``--repeats`` batches after ``--warmup`` (distinct query batches;
``torch.cuda.synchronize`` before every clock read). Ratios: search time over the time
to read the keys once at the measured bandwidth, and over the time of the fp16 matmul of
the same shape. Progress goes to stderr; the table is printed last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_latency import BenchConfig as BankSpec  # noqa: E402  (the bank generator)
from search_latency import write_synthetic_bank  # noqa: E402

from bankd.search import torch_search  # noqa: E402
from bankd.search.index import Searcher  # noqa: E402
from bankd.store.paths import VALUE_SHAPE  # noqa: E402
from bankd.store.reader import Bank  # noqa: E402
from bankd_client import tune_allocator  # noqa: E402

SERVER_START_S = 600.0
CHECK_ROWS = 16  # query rows per k checked against the float64 brute force


@dataclass(frozen=True)
class Config:
    n: int = 1_000_000
    d: int = 1152
    batch: int = 1024
    ks: tuple[int, ...] = (5, 100, 2048)
    repeats: int = 20
    warmup: int = 3
    clusters: int = 1000
    seed: int = 0
    server: bool = True
    max_message_mb: int = 256  # the server's and client's limit: values only if they fit
    variants: bool = True
    profile: bool = False
    device: str = "cuda"  # "cpu": a smoke test of this script (figures meaningless)
    workdir: str | None = None
    json: str | None = None


def progress(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sync() -> None:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def gpu_ms(fn: Any, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() on the GPU (CUDA events), after warm-up calls."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_initialized():  # --device cpu
        return wall_ms(lambda _: fn(), [None] * reps, 0)[0]
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def wall_ms(
    fn: Any, batches: list[Any], warmup: int, keep: bool = False
) -> tuple[float, list[Any]]:
    """Median wall milliseconds of fn(batch) over the measured batches (and, with keep,
    their outputs; kept raw_search outputs would hold pinned buffers between calls)."""
    times, outs = [], []
    for i, b in enumerate(batches):
        sync()
        t0 = time.perf_counter()
        out = fn(b)
        sync()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
            if keep:
                outs.append(out)
        del out
    return float(np.median(times)), outs


def parts_ms(index: torch_search.TorchFlatIndex, batches: list[Any], fetch: int, warmup: int):
    """Medians of raw_search's parts: queries to the device, the search, hits to the host."""
    times = []
    for i, (q, _) in enumerate(batches):
        t = [time.perf_counter()]
        qd = torch.from_numpy(q).to(index.device)
        sync()
        t.append(time.perf_counter())
        scores, rows = index.search(qd, fetch)
        sync()
        t.append(time.perf_counter())
        torch_search.to_host(scores, rows, device=index.device)
        t.append(time.perf_counter())
        if i >= warmup:
            times.append(np.diff(t) * 1e3)
    med = np.median(times, axis=0)
    return {
        "to_device_ms": float(med[0]),
        "on_device_ms": float(med[1]),
        "to_host_ms": float(med[2]),
    }


# -- the bank and the queries -----------------------------------------------------------


def bank_at(cfg: Config, folder: Path) -> Path:
    spec = BankSpec(n=cfg.n, d=cfg.d, clusters=cfg.clusters, seed=cfg.seed, index="Flat")
    path = folder / "bank.faiss"
    manifest = folder / "bank.manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("config") == spec.bank_spec():
        progress(f"reusing the bank at {path}")
        return path
    progress(f"writing a {cfg.n} x {cfg.d} bank to {path}")
    t0 = time.perf_counter()
    write_synthetic_bank(spec, path)
    progress(f"bank written in {time.perf_counter() - t0:.0f} s")
    return path


def query_batches(bank: Bank, cfg: Config) -> list[tuple[np.ndarray, np.ndarray]]:
    """(queries (B, d) float32, own entry ids (B,)): noisy copies of random bank keys."""
    rng = np.random.default_rng(cfg.seed + 1)
    total = (cfg.warmup + cfg.repeats) * cfg.batch
    rows = np.sort(rng.choice(cfg.n, size=total, replace=total > cfg.n))
    q = np.asarray(bank.keys[rows]) + rng.standard_normal((total, cfg.d), dtype=np.float32) * (
        0.3 / np.sqrt(cfg.d)
    )
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    perm = rng.permutation(total)
    q, own = q[perm].astype(np.float32), bank.ids[rows[perm]]
    return [(q[i : i + cfg.batch], own[i : i + cfg.batch]) for i in range(0, total, cfg.batch)]


# -- 1. the GPU's limits ----------------------------------------------------------------


def limits(keys: torch.Tensor, b: int, reps: int) -> dict[str, float]:
    n, d = keys.shape
    nbytes = keys.numel() * keys.element_size()
    out: dict[str, float] = {"key_bytes": nbytes}
    dst = torch.empty_like(keys)
    out["copy_ms"] = gpu_ms(lambda: dst.copy_(keys), reps)
    dst.set_()  # free it
    out["bandwidth_tb_s"] = 2 * nbytes / out["copy_ms"] / 1e9
    out["read_keys_ms"] = nbytes / (out["bandwidth_tb_s"] * 1e9)  # at the copy's rate
    out["sum_ms"] = gpu_ms(lambda: keys.sum(dtype=torch.float32), reps)
    q = torch.randn(b, d, device=keys.device).div_(d**0.5).to(keys.dtype)
    flop = 2 * b * n * d
    out["matmul_fp16_out_ms"] = gpu_ms(lambda: q @ keys.T, reps)
    out["matmul_fp16_out_tflops"] = flop / out["matmul_fp16_out_ms"] / 1e9
    with contextlib.suppress(TypeError, RuntimeError):
        out["matmul_fp32_out_ms"] = gpu_ms(
            lambda: torch.mm(q, keys.T, out_dtype=torch.float32), reps
        )
        out["matmul_fp32_out_tflops"] = flop / out["matmul_fp32_out_ms"] / 1e9
    m = 8192 if keys.is_cuda else 256
    a = torch.randn(m, m, device=keys.device).to(keys.dtype)
    out["matmul_square_ms"] = gpu_ms(lambda: a @ a, reps)
    out["matmul_square_tflops"] = 2 * m**3 / out["matmul_square_ms"] / 1e9
    torch.cuda.empty_cache()
    return out


# -- 2. the Searcher --------------------------------------------------------------------


def reference_check(
    index: torch_search.TorchFlatIndex, q: np.ndarray, own_rows: np.ndarray, k: int, got: Any
) -> dict[str, int]:
    """got (a SearchResult) against float64 brute force over the same fp16-rounded inputs:
    rows whose hits differ beyond near-ties (2e-5), and the largest score error."""
    qs = torch_search.pow2_scale(float(np.abs(q).max()))
    dev = index.keys.device
    qr = torch.from_numpy(q * qs).to(dev, index.dtype).double() / qs  # (R, d)
    full = torch.cat(
        [
            qr @ index.keys[s : s + 65_536].double().T / index.key_scale
            for s in range(0, index.n, 65_536)
        ],
        1,
    )  # (R, N) float64
    full[torch.arange(len(q)), torch.from_numpy(own_rows).to(dev)] = -torch.inf  # excluded
    full = full.cpu().numpy()
    bad, worst = 0, 0.0
    for i in range(len(q)):
        kth = np.partition(full[i], -k)[-k]
        mine = full[i, got.rows[i]]
        worst = max(worst, float(np.abs(mine - got.scores[i]).max()))
        must = set(np.flatnonzero(full[i] > kth + 2e-5).tolist())
        if mine.min() < kth - 2e-5 or not must <= set(got.rows[i].tolist()):
            bad += 1
    return {"rows_checked": len(q), "rows_wrong": bad, "max_score_error": worst}


def measure_searcher(
    searcher: Searcher, bank: Bank, batches: list[Any], cfg: Config
) -> dict[int, dict[str, Any]]:
    index = searcher.torch_index
    row_of = bank.rows_of
    gpu_q = [torch.from_numpy(q).to(cfg.device) for q, _ in batches]
    out: dict[int, dict[str, Any]] = {}
    for k in cfg.ks:
        fetch = k + 1
        r: dict[str, Any] = {}
        if index is not None:
            it = iter(range(10**9))
            r["gpu_ms"] = gpu_ms(
                lambda it=it, f=fetch: index.search(gpu_q[next(it) % len(gpu_q)], f),
                cfg.repeats,
                cfg.warmup,
            )
        r["raw_search_ms"], _ = wall_ms(
            lambda b, f=fetch: searcher.raw_search(b[0], f), batches, cfg.warmup
        )
        if index is not None:
            r |= parts_ms(index, batches, fetch, cfg.warmup)
        r["search_ms"], results = wall_ms(
            lambda b, k=k: searcher.search(b[0], k, [[int(e)] for e in b[1]]),
            batches,
            cfg.warmup,
            keep=True,
        )
        r["ids"] = [res.ids for res in results[:3]]  # compared with the server's answers
        if index is not None:
            q, own = batches[cfg.warmup]
            got = results[0]
            part = type(got)(*(a[:CHECK_ROWS] for a in (got.ids, got.scores, got.rows)))
            r["check"] = reference_check(index, q[:CHECK_ROWS], row_of(own[:CHECK_ROWS]), k, part)
        out[k] = r
        progress(
            f"  Searcher k={k}: " + ", ".join(f"{a} {v:.2f}" for a, v in r.items() if "ms" in a)
        )
    return out


# -- 3. variants of the torch path ------------------------------------------------------


def previous_search(keys: torch.Tensor, q: torch.Tensor, fetch: int) -> Any:
    """The code this replaced: one (B, N) fp16 product, upcast, one top-k."""
    return torch.topk((q @ keys.T).float(), fetch, dim=1)


def measure_variants(
    index: torch_search.TorchFlatIndex, batches: list[Any], cfg: Config
) -> dict[str, dict[int, float]]:
    q = torch.from_numpy(batches[0][0]).to(cfg.device)
    b = len(q)
    default = index.block_bytes
    reps = max(5, cfg.repeats // 2)
    out: dict[str, dict[int, float]] = {}

    def run(name: str, fn: Any) -> None:
        for k in cfg.ks:
            try:
                out.setdefault(name, {})[k] = gpu_ms(lambda k=k: fn(k + 1), reps)
            except torch.OutOfMemoryError:
                out[name][k] = float("nan")
            torch.cuda.empty_cache()

    run(f"default: blocks of {default >> 20} MB, group pre-selection", lambda f: index.search(q, f))
    keep = torch_search.GROUP_MAX
    torch_search.GROUP_MAX = 1
    try:
        run(f"blocks of {default >> 20} MB, plain top-k", lambda f: index.search(q, f))
    finally:
        torch_search.GROUP_MAX = keep
    for mb in (256, 2048):
        index.block_bytes = mb << 20
        run(f"blocks of {mb} MB, group pre-selection", lambda f: index.search(q, f))
    index.block_bytes = 4 * b * index.n
    run("one block of (B, N), group pre-selection", lambda f: index.search(q, f))
    index.block_bytes = default
    q16 = q.to(index.dtype)
    run(
        "previous: one (B, N) fp16 matmul, .float(), top-k",
        lambda f: previous_search(index.keys, q16, f),
    )
    return out


def profile(index: torch_search.TorchFlatIndex, batches: list[Any], cfg: Config) -> str:
    """torch.profiler's table of the kernels of three searches per k (--profile)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    q = torch.from_numpy(batches[0][0]).to(cfg.device)
    tables = []
    for k in cfg.ks:
        index.search(q, k + 1)
        sync()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                index.search(q, k + 1)
            sync()
        table = "no table"
        for key in ("self_device_time_total", "self_cuda_time_total"):
            with contextlib.suppress(Exception):  # the key's name changed across versions
                table = prof.key_averages().table(sort_by=key, row_limit=14)
                break
        tables.append(f"profile, k={k} (3 searches):\n{table}")
    return "\n".join(tables)


# -- 4. the server ----------------------------------------------------------------------


class Server:
    """``bankd serve --device cuda`` in a child process, on free loopback ports."""

    def __init__(self, index: Path, log: Path, cfg: Config) -> None:
        self._log = open(log, "wb")
        cmd = [sys.executable, "-m", "bankd", "--log-level", "WARNING", "serve"]
        cmd += ["--index", str(index), "--port", "0", "--metrics-port", "-1"]
        cmd += ["--device", cfg.device, "--no-verify", "--no-embed", "--grace", "1"]
        cmd += ["--max-k", str(max(cfg.ks)), "--max-message-mb", str(cfg.max_message_mb)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log)
        for line in iter(self.proc.stdout.readline, b""):  # "bankd serving ... on HOST:PORT"
            m = re.search(r"serving .* on [\d.]+:(\d+)", line.decode())
            if m:  # printed once the bank is loaded
                self.port = int(m.group(1))
                return
        self.stop()
        raise RuntimeError(f"bankd serve did not start; its log ends:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()


def measure_server(
    path: Path, batches: list[Any], cfg: Config, direct: dict[int, dict[str, Any]], log: Path
) -> dict[str, Any]:
    from bankd_client import BankClient

    progress(f"starting bankd serve --device {cfg.device}")
    t0 = time.perf_counter()
    server = Server(path, log, cfg)
    out: dict[str, Any] = {"start_s": time.perf_counter() - t0}
    limit = cfg.max_message_mb << 20
    try:
        with BankClient(f"127.0.0.1:{server.port}", timeout=600, max_message_bytes=limit) as c:
            c.wait_ready(timeout=SERVER_START_S)
            out["search_device"] = c.info().search_device
            for k in cfg.ks:
                r: dict[str, Any] = {}
                excl = [[[int(e)] for e in own] for _, own in batches]
                pairs = list(zip([q for q, _ in batches], excl, strict=True))

                def rpc(p: Any, k: int = k, values: bool = False) -> Any:
                    return c.search(p[0], k, exclude_ids=p[1], with_values=values)

                r["ids_only_ms"], hits = wall_ms(rpc, pairs, cfg.warmup, keep=True)
                r["differ_from_searcher"] = sum(  # as sets: tied hits may swap places
                    int((np.sort(h.ids, 1) != np.sort(want, 1)).any(axis=1).sum())
                    for h, want in zip(hits, direct[k]["ids"], strict=False)
                )
                response = cfg.batch * k * (12 + 2 * int(np.prod(VALUE_SHAPE))) + 4096
                if response <= limit:
                    r["values_ms"], _ = wall_ms(lambda p: rpc(p, values=True), pairs, cfg.warmup)
                    r["values_mb"] = response / 1e6
                out[k] = r
                progress(f"  server k={k}: {r}")
    finally:
        server.stop()
    return out


# -- report -----------------------------------------------------------------------------


def report(cfg: Config, r: dict[str, Any]) -> str:
    lim, s = r["limits"], r["searcher"]
    srv = r.get("server") or {}
    floor_bw, floor_mm = lim["read_keys_ms"], lim["matmul_fp16_out_ms"]
    lines = [
        f"GPU: {r['gpu']}; torch {torch.__version__}; search path: {r['path']}",
        f"bank: N={cfg.n} d={cfg.d} (fp16 keys {lim['key_bytes'] / 1e9:.2f} GB), B={cfg.batch}, "
        f"medians of {cfg.repeats} batches after {cfg.warmup} warm-up; each query excludes its "
        "own entry (k + 1 fetched)",
        "limits measured in this run:",
        f"  copy of the keys (device to device): {lim['copy_ms']:.3f} ms = "
        f"{lim['bandwidth_tb_s']:.2f} TB/s read + write; reading them once at that rate: "
        f"{floor_bw:.3f} ms (a sum over them: {lim['sum_ms']:.3f} ms)",
        f"  fp16 matmul ({cfg.batch} x {cfg.d}) @ ({cfg.d} x {cfg.n}): fp16 out "
        f"{lim['matmul_fp16_out_ms']:.3f} ms = {lim['matmul_fp16_out_tflops']:.0f} TFLOP/s"
        + (
            f"; fp32 out {lim['matmul_fp32_out_ms']:.3f} ms = "
            f"{lim['matmul_fp32_out_tflops']:.0f} TFLOP/s"
            if "matmul_fp32_out_ms" in lim
            else ""
        ),
        f"  fp16 matmul, square: {lim['matmul_square_tflops']:.0f} TFLOP/s",
        "",
        f"  {'k':>5} {'GPU ms':>8} {'raw ms':>8} {'search':>8} {'RPC ids':>8} {'RPC vals':>9}"
        f" {'GPU/bw':>7} {'GPU/mm':>7} {'srch/mm':>8}  exact (rows wrong / checked)",
    ]
    for k in cfg.ks:
        a, b = s[k], srv.get(k, {})
        gpu = a.get("gpu_ms", float("nan"))
        chk = a.get("check", {})

        def f(v: Any, w: int = 8) -> str:
            return f"{v:{w}.2f}" if isinstance(v, float) else f"{'-':>{w}}"

        lines.append(
            f"  {k:>5} {f(gpu)} {f(a['raw_search_ms'])} {f(a['search_ms'])} "
            f"{f(b.get('ids_only_ms'))} {f(b.get('values_ms'), 9)} {gpu / floor_bw:7.2f} "
            f"{gpu / floor_mm:7.2f} {a['search_ms'] / floor_mm:8.2f}  "
            f"{chk.get('rows_wrong', '-')} / {chk.get('rows_checked', '-')} "
            f"(max score error {chk.get('max_score_error', float('nan')):.1e})"
        )
    lines.append(
        "  GPU = Searcher.torch_index.search on device queries; raw = Searcher.raw_search "
        "(host queries in, numpy out); search = Searcher.search (+ exclusion filter)"
    )
    for k in cfg.ks:
        if "on_device_ms" in s[k]:
            a = s[k]
            lines.append(
                f"  k={k}: raw_search = queries to the device {a['to_device_ms']:.2f} ms + search "
                f"{a['on_device_ms']:.2f} ms + hits to the host {a['to_host_ms']:.2f} ms; the "
                f"exclusion filter (search - raw) {a['search_ms'] - a['raw_search_ms']:.2f} ms"
            )
    if srv:
        vals = [f"k={k}: {srv[k]['values_mb']:.0f} MB" for k in cfg.ks if "values_mb" in srv[k]]
        differ = sum(srv[k]["differ_from_searcher"] for k in cfg.ks)
        lines.append(
            f"  RPC = BankClient.search over loopback to bankd serve (search_device "
            f"{srv['search_device']}); with values {', '.join(vals) or 'none'} "
            f"(--max-message-mb {cfg.max_message_mb}); rows whose ids differ from the "
            f"Searcher's: {differ}"
        )
    if r.get("variants"):
        lines += ["", "variants of the torch path, GPU ms (median):"]
        lines.append(f"  {'':<62}" + "".join(f"{'k=' + str(k):>9}" for k in cfg.ks))
        for name, by_k in r["variants"].items():
            lines.append(f"  {name:<62}" + "".join(f"{by_k[k]:9.2f}" for k in cfg.ks))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Config:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = Config()
    p.add_argument("--n", type=int, default=d.n, help="bank entries")
    p.add_argument("--d", type=int, default=d.d, help="key dimension")
    p.add_argument("--batch", type=int, default=d.batch, help="queries per search (B)")
    p.add_argument("--k", default=",".join(map(str, d.ks)), help="hits per query, comma-separated")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--clusters", type=int, default=d.clusters)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-server", action="store_true", help="skip the bankd server part")
    p.add_argument("--no-variants", action="store_true", help="skip the variants table")
    p.add_argument("--profile", action="store_true", help="print torch.profiler kernel tables")
    p.add_argument("--max-message-mb", type=int, default=d.max_message_mb)
    p.add_argument("--device", default=d.device, help="cuda; cpu only smoke-tests this script")
    p.add_argument("--workdir", default=None, help="keep the bank here (reused if it matches)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)
    ks = tuple(int(k) for k in a.k.split(","))
    if min(a.n, a.d, a.batch, a.repeats, a.clusters, *ks) < 1 or a.warmup < 0 or max(ks) >= a.n:
        p.error("n, d, batch, repeats, clusters, k must be positive, warmup >= 0, k < n")
    return Config(
        n=a.n,
        d=a.d,
        batch=a.batch,
        ks=ks,
        repeats=a.repeats,
        warmup=a.warmup,
        clusters=a.clusters,
        seed=a.seed,
        server=not a.no_server,
        max_message_mb=a.max_message_mb,
        variants=not a.no_variants,
        profile=a.profile,
        device=a.device,
        workdir=a.workdir,
        json=a.json,
    )


@dataclass
class Results:
    gpu: str
    path: str
    limits: dict[str, float] = field(default_factory=dict)
    searcher: dict[int, dict[str, Any]] = field(default_factory=dict)
    variants: dict[str, dict[int, float]] = field(default_factory=dict)
    server: dict[str, Any] = field(default_factory=dict)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    tune_allocator()  # as `bankd serve` and trainers do: big numpy temporaries stay mapped
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_search.py needs a CUDA device", file=sys.stderr)
        return 2
    progress(f"config: {asdict(cfg)}")
    kept = contextlib.nullcontext(cfg.workdir) if cfg.workdir else None
    with kept or tempfile.TemporaryDirectory(prefix="bankd-gpu-bench-") as where:
        folder = Path(where)
        folder.mkdir(parents=True, exist_ok=True)
        path = bank_at(cfg, folder)
        bank = Bank.load(path, verify=False)
        batches = query_batches(bank, cfg)
        t0 = time.perf_counter()
        searcher = Searcher(bank.index, bank.keys, bank.ids, device=cfg.device)
        if cfg.device == "cpu":  # smoke test: the torch path on the CPU, in fp32
            searcher.torch_index = torch_search.TorchFlatIndex(bank.keys, "cpu")
        progress(f"Searcher on {searcher.device} in {time.perf_counter() - t0:.1f} s")
        index = searcher.torch_index
        path_name = "torch (bankd.search.torch_search)" if index is not None else "FAISS GPU"
        gpu = torch.cuda.get_device_name() if cfg.device != "cpu" else "none (CPU smoke test)"
        res = Results(gpu, path_name)
        progress("measuring the GPU's limits")
        keys = (index or torch_search.TorchFlatIndex(bank.keys, cfg.device)).keys
        res.limits = limits(keys, cfg.batch, cfg.repeats)
        del keys
        res.searcher = measure_searcher(searcher, bank, batches, cfg)
        if cfg.variants and index is not None:
            progress("measuring variants of the torch path")
            res.variants = measure_variants(index, batches, cfg)
        if cfg.profile and index is not None:
            print(profile(index, batches, cfg), flush=True)
        del searcher, index
        torch.cuda.empty_cache()  # the server process loads its own copy of the keys
        if cfg.server:
            res.server = measure_server(path, batches, cfg, res.searcher, folder / "server.log")
    for r in res.searcher.values():
        r.pop("ids", None)
    text = report(cfg, asdict(res))
    print(text, flush=True)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps({"config": asdict(cfg), **asdict(res)}, indent=1))
        progress(f"figures written to {cfg.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
