"""Exact top-k inner-product search on the CPU's matrix units: bfloat16 products, then
an exact fp32 re-rank, with a candidate margin that provably keeps every true hit.

Where the CPU has AMX (or AVX-512-BF16), torch's bf16 matrix product (oneDNN) runs
several times faster than any fp32 one. Its scores are not the exact ones, so they are
used only to choose candidates; the candidates are then scored again with bankd's
kernel arithmetic (``flat_kernel.rescore``: one fp32 fused multiply-add per element, in
order), so ids and scores are bit-identical to ``flat_kernel.FlatKernel``'s for any k.

The bound. Keys are scaled by one power of two and each query by its own (exact, and
ranking per query is unchanged) so that every element lies in [-1, 1]. For a query q
and key k (scaled, fp32), bf16 rounds each element to nearest even with unit roundoff
u = 2^-8: |q~_i - q_i| <= u |q_i| + t and |k~_i - k_i| <= u |k_i| + t, where t = 2^-126
covers operands flushed to zero. With q~_i k~_i - q_i k_i = (q~_i - q_i) k~_i +
q_i (k~_i - k_i) and Cauchy-Schwarz,

    |sum q~_i k~_i - q.k| <= (2u + u^2) |q| |k|  (+ terms in t).

The products of bf16 numbers are exact in fp32 and oneDNN accumulates them in fp32 in
some order, each addition rounded with unit roundoff 2^-24 (fused steps round less), so
the accumulated a differs from the exact sum by at most g_d sum |q~_i k~_i| <=
g_d (1 + u)^2 |q| |k| with g_d = d 2^-24 / (1 - d 2^-24) (+ a flushed underflow of at
most t per step). The result is rounded to bf16 once more: |s~ - a| <= u |a| + t and
|a| <= |q.k| + (the above). Altogether

    |s~ - q.k| <= e(q, k) = C_d |q| |k| + eta,
    C_d = ((2u + u^2) + g_d (1 + u)^2)(1 + u) + u,     eta = 8 (d + 1) 2^-126,

eta bounding the at most 5d + 2 flush terms of size <= 2^-126 each (operands <= 1).

The answer to match is not q.k but the fp32 score r the kernel computes (on the
unscaled vectors), itself off by |r - q.k| <= g_d |q| |k| + d 2^-149 s_q s_k (the
relative bound of d roundings, and what gradual underflow can lose, s_q and s_k being
the scales). So this engine uses, for all keys of query q,

    E_q = (C_d + g_d) |q| max_j |k_j| + eta + d 2^-149 s_q s_k     (scaled units),

and sends to the fp32 kernel any query whose unscaled |q| max_j |k_j| reaches 2^126,
where fp32 scores could overflow.

The candidates. Let T be the k-th best low-precision score of q. k keys have fp32
scores r >= their s~ - E_q >= T - E_q, so the k-th best fp32 score, and with it every
key of the fp32 top k (ties included, whatever their order), is >= T - E_q; such a key
has s~ >= its r - E_q >= T - 2 E_q. So every key with s~ >= T - 2 E_q is taken:
the scan keeps the running k-th best (it only rises), collects every score at or
above it minus 2 E_q, then drops those below the final T - 2 E_q. A query whose
candidates exceed ``CANDIDATES_CAP`` (adversarial ties, a few huge-norm keys) is
searched by the fp32 kernel instead: never wrong, at worst as slow as it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from bankd.search import flat_kernel

U = 2.0**-8  # bf16 unit roundoff (8 significant bits, round to nearest even)
U32 = 2.0**-24  # fp32 unit roundoff
TINY = 2.0**-126  # smallest normal fp32/bf16: what flush-to-zero can lose per step
# Norms are computed in float64 from fp32 values (relative error ~ d 2^-53); this
# factor covers that, and the rounding of the margin to fp32 is upwards.
NORM_SLACK = 1.0 + 2.0**-20
BLOCK_ROWS = 16_384  # keys per bf16 product: (128 x 16384) bf16 scores = 4 MB
CALL_QUERIES = 256  # queries per pass over the keys
CANDIDATES_CAP = 1024  # candidates kept per query beyond k; more: the fp32 kernel
# "auto" considers this engine only for banks of at least this many key elements (16 MB
# of fp32 keys): below, the fp32 kernel answers in a few milliseconds anyway, and torch
# (seconds to import, ~300 MB) stays out of the server.
AUTO_MIN_ELEMENTS = 1 << 22


def gamma(d: int) -> float:
    """g_d: relative error bound of d fp32 roundings (in any order)."""
    return d * U32 / (1.0 - d * U32)


def error_coefficient(d: int) -> float:
    """C_d of the module docstring: |s~ - q.k| <= C_d |q| |k| + eta."""
    g = gamma(d)
    return ((2 * U + U * U) + g * (1 + U) ** 2) * (1 + U) + U


def absolute_error(d: int) -> float:
    """eta of the module docstring: what flush-to-zero of subnormals can add."""
    return 8.0 * (d + 1) * TINY


def pow2_scales(amax: np.ndarray) -> np.ndarray:
    """Per entry a power of two p with amax * p in (0.5, 1] (1 for 0 or non-finite)."""
    amax = np.asarray(amax, dtype=np.float64)
    ok = np.isfinite(amax) & (amax > 0)
    _, e = np.frexp(np.where(ok, amax, 1.0))  # amax = m 2^e, m in [0.5, 1)
    # amax = 2^e exactly would give m = 0.5 and amax * 2^-e = 1, still in (0.5, 1].
    return np.where(ok, np.ldexp(1.0, -e), 1.0)


def machine_has_bf16_units() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX tiles or AVX-512-BF16), from
    /proc/cpuinfo; False where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        pass
    return False


def available() -> bool:
    """Whether the engine runs here: bf16 units, bankd's kernel (re-rank, fallback,
    AVX-512 candidate scan) and torch."""
    if not (machine_has_bf16_units() and flat_kernel.available()):
        return False
    if not flat_kernel.collect_available():
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


class Bf16Search:
    """Exact top-k over keys [N, d] float32 (C-contiguous, kept by reference; a bf16
    copy, scaled, is made), on ``threads`` threads. Same results as ``kernel``."""

    def __init__(self, keys: np.ndarray, kernel: flat_kernel.FlatKernel, threads: int = 1) -> None:
        import torch

        if keys.ndim != 2 or keys.dtype != np.float32 or not keys.flags.c_contiguous:
            raise ValueError(f"keys must be C-contiguous float32 [N, d], got {keys.dtype}")
        if len(keys) == 0:
            raise ValueError("keys must hold at least one row")
        self._torch = torch
        self.keys, self.kernel = keys, kernel
        self.n, self.d = keys.shape
        self.threads = max(1, int(threads))
        # torch's (oneDNN's) threads are a setting of the process: the searcher's count
        # (`bankd serve --threads`) holds for its products too.
        torch.set_num_threads(self.threads)
        amax, norm_max = 0.0, 0.0
        chunks = range(0, self.n, 65_536)
        for s in chunks:
            block = keys[s : s + 65_536]
            if not np.isfinite(block).all():
                raise ValueError(f"keys rows {s}..{s + len(block) - 1} hold NaN or inf")
            amax = max(amax, float(np.abs(block).max()))
        self.key_scale = float(pow2_scales(np.array([amax]))[0])
        self.keys_bf16 = torch.empty((self.n, self.d), dtype=torch.bfloat16)
        for s in chunks:
            scaled = torch.from_numpy(np.array(keys[s : s + 65_536])) * self.key_scale
            norm_max = max(norm_max, float(scaled.double().norm(dim=1).max()))
            self.keys_bf16[s : s + len(scaled)] = scaled.to(torch.bfloat16)
        self.key_norm_max = norm_max * NORM_SLACK  # of the scaled keys
        self.coef = (error_coefficient(self.d) + gamma(self.d)) * NORM_SLACK
        self.eta = absolute_error(self.d)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="bankd-bf16")

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def margins(self, scaled_queries: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """2 E_q per query [B] float32 (rounded up) for scaled queries [B, d] and their
        scales [B]."""
        qn = np.linalg.norm(scaled_queries.astype(np.float64), axis=1) * NORM_SLACK
        underflow = self.d * 2.0**-149 * scales * self.key_scale
        m = 2.0 * (self.coef * qn * self.key_norm_max + self.eta + underflow)
        return np.nextafter(m.astype(np.float32), np.float32(np.inf))

    def may_overflow(self, scaled_queries: np.ndarray, scales: np.ndarray) -> np.ndarray:
        """[B] bool: fp32 scores of the unscaled query could overflow."""
        qn = np.linalg.norm(scaled_queries.astype(np.float64), axis=1) * NORM_SLACK
        return qn * self.key_norm_max / (scales * self.key_scale) >= 2.0**126

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Best k (scores [B, k] float32, rows [B, k] int64) of queries [B, d], by score
        descending then row ascending (rows -1 with -inf past N), as FlatKernel.search."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        b, d = queries.shape
        if d != self.d:
            raise ValueError(f"queries have dim {d}, keys {self.d}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        fetch = min(k, self.n)
        scores = np.full((b, k), -np.inf, dtype=np.float32)
        rows = np.full((b, k), -1, dtype=np.int64)
        for q0 in range(0, b, CALL_QUERIES):
            q = queries[q0 : q0 + CALL_QUERIES]
            s, r = self._search_chunk(q, fetch)
            scores[q0 : q0 + len(q), :fetch], rows[q0 : q0 + len(q), :fetch] = s, r
        return scores, rows

    def _search_chunk(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        b = len(queries)
        finite = np.isfinite(queries).all(1)
        scale = pow2_scales(np.abs(np.where(finite[:, None], queries, 0)).max(1))
        scaled = (queries * scale[:, None].astype(np.float32)).astype(np.float32)
        margin = self.margins(scaled, scale)
        cap = k + CANDIDATES_CAP
        heap = np.full((b, k), -np.inf, dtype=np.float32)
        cand_s = np.full((b, cap), -np.inf, dtype=np.float32)
        cand_r = np.full((b, cap), -1, dtype=np.int64)
        count = np.zeros(b, dtype=np.int64)
        qb = torch.from_numpy(np.where(finite[:, None], scaled, 0)).to(torch.bfloat16)
        parts = np.linspace(0, b, min(self.threads, b) + 1).astype(np.int64)
        for s in range(0, self.n, BLOCK_ROWS):
            block = torch.mm(qb, self.keys_bf16[s : s + BLOCK_ROWS].T)  # (b, c) bf16
            bits = block.view(torch.int16).numpy().view(np.uint16)

            def collect(p: int, bits: np.ndarray = bits, s: int = s) -> None:
                lo, hi = int(parts[p]), int(parts[p + 1])
                flat_kernel.collect_candidates(
                    bits[lo:hi], s, margin[lo:hi], heap[lo:hi], cand_s[lo:hi], cand_r[lo:hi],
                    count[lo:hi],
                )  # fmt: skip

            list(self._pool.map(collect, range(len(parts) - 1)))
        # Final threshold: k-th best (the heap's root) - 2 E_q, in float64 (exact here).
        thr = heap.min(1).astype(np.float64) - margin.astype(np.float64)
        held = np.arange(cap)[None, :] < np.minimum(count, cap)[:, None]
        keep = held & (cand_s.astype(np.float64) >= thr[:, None])
        fallback = ~finite | (count > cap) | self.may_overflow(scaled, scale)
        keep[fallback] = False
        width = max(int(keep.sum(1).max(initial=0)), k)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # kept columns first
        cand = np.take_along_axis(cand_r, order, 1)
        cand[~np.take_along_axis(keep, order, 1)] = -1
        exact = self._rescore(queries, cand)
        best = np.lexsort((np.where(cand < 0, self.n, cand), -exact), axis=-1)[:, :k]
        out_s = np.take_along_axis(exact, best, 1)
        out_r = np.take_along_axis(cand, best, 1)
        if fallback.any():
            fs, fr = self.kernel.search(queries[fallback], k)
            out_s[fallback], out_r[fallback] = fs, fr
        return out_s, out_r

    def _rescore(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        b = len(queries)
        out = np.empty(rows.shape, dtype=np.float32)
        parts = np.linspace(0, b, min(self.threads, b) + 1).astype(np.int64)

        def run(p: int) -> None:
            lo, hi = int(parts[p]), int(parts[p + 1])
            out[lo:hi] = flat_kernel.rescore(self.keys, queries[lo:hi], rows[lo:hi])

        list(self._pool.map(run, range(len(parts) - 1)))
        return out


__all__ = ["Bf16Search", "available", "error_coefficient"]
