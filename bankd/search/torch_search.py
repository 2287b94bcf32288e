"""Exact top-k search over a bank's keys with torch: the CUDA path of ``bankd.search.index``.

Used when the FAISS build has no GPU support (faiss-cpu). Keys live on the device in
fp16 (half the bytes of fp32; on the CPU, for tests, fp32). A search never holds the
whole (B, N) score matrix: the keys are taken in blocks of rows so that one block's
fp32 scores fit ``block_bytes``, and for each block

    scores = queries @ keys[block].T           # (B, c) fp16 x fp16 -> fp32 accumulate and out
    best   = top `fetch` of scores per row     # see _block_topk

and the blocks' best hits are merged by one more top-k. Memory stays at about
``block_bytes`` plus (B, fetch) candidates, whatever N is.

``_block_topk`` first takes the maximum of each group of g columns (one read of the
block) and keeps the `fetch` best groups: they hold the `fetch` best scores (each of
those scores lies in a group whose maximum is at least that score, and there are at
most `fetch` such groups), so a top-k over the fetch * g columns of those groups is
exact, up to the order of tied scores. torch's radix top-k reads its input several
times; the group maxima cut that to one read of the block plus a small top-k (on an
H100, B=1024, N=1M, k=5: 17 ms with a plain top-k per block, 7 ms with groups).

Blocks run one after the other: a second CUDA stream that ran block i's top-k while
block i + 1 was multiplied gained 1-1.6% on an H100 (the matrix product fills the GPU).

Scores are exact inner products of the fp16-rounded keys and queries (fp32 accumulation
and output). fp16 covers magnitudes up to 65504: keys and queries are scaled by powers
of two (exact) into [-1, 1] before rounding and the scores scaled back, so no input
overflows. The metric is inner product ("ip"), or squared L2 distance ("l2", ranked by
2 q.k - |k|^2 and returned as distances, ascending, as FAISS does).
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCORE_BLOCK_BYTES = 2**30  # fp32 scores of one block of keys, at most
LOAD_ROWS = 65_536  # keys converted and copied to the device at a time
GROUP_MAX = 256  # largest column group of the group-maximum pre-selection
GROUP_SPARSITY = 8  # groups are used only when fetch * g <= block columns / this
MERGE_EVERY = 8  # blocks' candidates merged into one (B, fetch) set this often


def pow2_scale(amax: float) -> float:
    """A power of two p with amax * p in (0.5, 1] (1 for 0 or a non-finite amax)."""
    if not amax > 0 or not math.isfinite(amax):
        return 1.0
    return 2.0 ** -math.ceil(math.log2(amax))


def group_size(fetch: int, columns: int) -> int:
    """Column group of the pre-selection for a block: 1 (plain top-k) when not worth it."""
    g = GROUP_MAX
    while g > 1 and fetch * g * GROUP_SPARSITY > columns:
        g //= 2
    return g if g >= 4 else 1


def _block_topk(scores: torch.Tensor, fetch: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best min(fetch, c) (scores, columns) of each row of a score block (B, c), unordered;
    c is a multiple of group."""
    b, c = scores.shape
    fetch = min(fetch, c)
    if group == 1:
        top = torch.topk(scores, fetch, dim=1, sorted=False)
        return top.values, top.indices
    assert c % group == 0, (c, group)
    # Group j holds columns j, j + w, j + 2w, ... (w = c / g): the maximum over the
    # middle axis reads each row in long contiguous runs, at full memory bandwidth (a
    # maximum over g adjacent columns ran at a fifth of it for g = 4).
    w = c // group
    strided = scores.view(b, group, w)  # (B, g, w)
    best = strided.amax(1).topk(fetch, dim=1, sorted=False).indices  # (B, fetch) groups
    cand = strided.gather(2, best.unsqueeze(1).expand(-1, group, -1))  # (B, g, fetch)
    top = cand.view(b, -1).topk(fetch, dim=1, sorted=False)
    cols = best.gather(1, top.indices % fetch) + (top.indices // fetch) * w
    return top.values, cols


def _merge(
    values: list[torch.Tensor], rows: list[torch.Tensor], fetch: int, sort: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    v, r = torch.cat(values, 1), torch.cat(rows, 1)
    top = torch.topk(v, min(fetch, v.shape[1]), dim=1, sorted=sort)
    return top.values, r.gather(1, top.indices)


class TorchFlatIndex:
    """A bank's keys on a torch device, searched exactly, block by block.

    Args:
        keys: the keys [N, d] (float32, may be memory-mapped); copied in chunks.
        device: a torch device ("cuda", "cuda:1", "cpu").
        metric: "ip" (inner product) or "l2" (squared distance).
        dtype: storage and matmul dtype; default fp16 on CUDA, fp32 elsewhere.
        block_bytes: the largest fp32 score block of one step.
    """

    def __init__(
        self,
        keys: np.ndarray,
        device: str | torch.device,
        *,
        metric: str = "ip",
        dtype: torch.dtype | None = None,
        block_bytes: int = SCORE_BLOCK_BYTES,
    ) -> None:
        if metric not in ("ip", "l2"):
            raise ValueError(f"unknown metric {metric!r} (choose from ['ip', 'l2'])")
        if keys.ndim != 2 or len(keys) == 0:
            raise ValueError(f"keys must be [N, d] with N >= 1, got shape {keys.shape}")
        self.device = torch.device(device)
        self.metric, self.block_bytes = metric, block_bytes
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.n, self.d = keys.shape
        self.keys = torch.empty((self.n, self.d), dtype=self.dtype, device=self.device)
        # Each chunk is scaled by its own power of two, then all to the smallest: exact,
        # and no chunk of fp32 keys is ever held whole on the device.
        scales = []
        for s in range(0, self.n, LOAD_ROWS):
            x = torch.from_numpy(np.array(keys[s : s + LOAD_ROWS], dtype=np.float32))
            x = x.to(self.device)
            if not torch.isfinite(x).all():
                raise ValueError(f"keys rows {s}..{s + len(x) - 1} hold NaN or inf")
            scale = pow2_scale(x.abs().max().item()) if self.dtype == torch.float16 else 1.0
            self.keys[s : s + len(x)] = x * scale
            scales.append(scale)
        self.key_scale = min(scales)
        for i, scale in enumerate(scales):
            if scale != self.key_scale:
                self.keys[i * LOAD_ROWS : (i + 1) * LOAD_ROWS] *= self.key_scale / scale
        self.neg_sq_norms = None  # -|k|^2 (N,) float32 of the fp16-rounded keys, for "l2"
        if metric == "l2":
            parts = range(0, self.n, LOAD_ROWS)
            sq = [self.keys[s : s + LOAD_ROWS].float().square().sum(1) for s in parts]
            self.neg_sq_norms = torch.cat(sq).neg_() / self.key_scale**2
        # Half-precision products straight into fp32 (torch >= 2.8 on CUDA); else upcast.
        half = self.dtype != torch.float32
        self._mm_fp32_out = half and _fp32_out_works(self.device, self.dtype, "mm")
        self._addmm_fp32_out = half and _fp32_out_works(self.device, self.dtype, "addmm")

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size()

    def _scores(self, q: torch.Tensor, s: int, e: int, alpha: float, out: torch.Tensor) -> None:
        """out (B, e - s) = fp32 ranking scores of queries q (scaled) against keys s:e."""
        kt = self.keys[s:e].T  # (d, c), a view: cuBLAS reads it transposed
        if self.neg_sq_norms is not None:  # 2 q.k - |k|^2; alpha carries the scales
            neg = self.neg_sq_norms[s:e]
            if self._addmm_fp32_out:
                torch.addmm(neg, q, kt, alpha=alpha, out_dtype=torch.float32, out=out)
            else:
                torch.addmm(neg, q.float(), kt.float(), alpha=alpha, out=out)
        elif self._mm_fp32_out:
            torch.mm(q, kt, out_dtype=torch.float32, out=out)
        else:
            torch.mm(q.float(), kt.float(), out=out)  # fp32 keys, or no out_dtype in torch

    def _pieces(self, fetch: int, block: int) -> list[tuple[int, int, int]]:
        """(start, end, group) of the key blocks; a last block that is not a multiple of
        its group is split, its few last rows searched by plain top-k."""
        pieces = []
        for s in range(0, self.n, block):
            e = min(s + block, self.n)
            g = group_size(fetch, e - s)
            cut = e - (e - s) % g
            pieces += [(s, cut, g)] + ([(cut, e, 1)] if cut < e else [])
        return pieces

    @torch.inference_mode()
    def search(self, queries: torch.Tensor, fetch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``fetch`` (scores, rows) per query (B, d), best first, on the device.

        Scores are float32 inner products (or squared distances for "l2"); rows int64.
        """
        if queries.ndim != 2 or queries.shape[1] != self.d or len(queries) == 0:
            raise ValueError(f"queries must be [B, {self.d}], got {list(queries.shape)}")
        b = queries.shape[0]
        if not 1 <= fetch <= self.n:
            raise ValueError(f"fetch={fetch} is out of range 1..{self.n}")
        q32 = queries.to(self.device, torch.float32)
        q_scale = pow2_scale(q32.abs().max().item()) if self.dtype == torch.float16 else 1.0
        q = (q32 * q_scale).to(self.dtype)
        unscale = 1.0 / (q_scale * self.key_scale)
        block = max(fetch, self.block_bytes // (4 * b))
        block = min(self.n, -(-block // GROUP_MAX) * GROUP_MAX)  # whole groups
        v, r = self._select(q, self._pieces(fetch, block), fetch, 2.0 * unscale)
        if self.neg_sq_norms is not None:  # |q|^2 - (2 q.k - |k|^2), ascending
            q_norms = (q.float() / q_scale).square().sum(1, keepdim=True)  # rounded, like keys
            return q_norms - v, r
        return v * unscale, r

    def _select(
        self, q: torch.Tensor, pieces: list[tuple[int, int, int]], fetch: int, alpha: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best fetch (ranking scores, rows), best first: blocks one after the other."""
        values: list[torch.Tensor] = []
        rows: list[torch.Tensor] = []
        for s, e, group in pieces:
            scores = torch.empty((len(q), e - s), dtype=torch.float32, device=self.device)
            self._scores(q, s, e, alpha, scores)
            v, c = _block_topk(scores, fetch, group)
            del scores  # the allocator reuses the block for the next one
            values.append(v)
            rows.append(c + s)
            if len(values) > MERGE_EVERY:
                v, r = _merge(values, rows, fetch, sort=False)
                values, rows = [v], [r]
        return _merge(values, rows, fetch, sort=True)

    def search_numpy(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        """``search`` for numpy queries (B, d): (scores (B, fetch) float32, rows int64)."""
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
        scores, rows = self.search(q, fetch)
        return to_host(scores, rows, device=self.device)


def to_host(*tensors: torch.Tensor, device: torch.device) -> tuple[np.ndarray, ...]:
    if device.type != "cuda":
        return tuple(t.numpy() for t in tensors)
    # Pinned buffers (cached by torch's host allocator): about twice the copy rate of
    # pageable memory, which matters at k=2048 (25 MB of hits for B=1024).
    out = []
    for t in tensors:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        out.append(host)
    torch.cuda.current_stream(device).synchronize()
    return tuple(h.numpy() for h in out)


def _fp32_out_works(device: torch.device, dtype: torch.dtype, op: str) -> bool:
    """Whether this torch's ``op`` multiplies dtype matrices into fp32 (``out_dtype=``)."""
    a = torch.ones((2, 8), dtype=dtype, device=device)
    out = torch.empty((2, 2), device=device)
    try:
        if op == "mm":
            torch.mm(a, a.T, out_dtype=torch.float32, out=out)
        else:
            torch.addmm(torch.ones(2, device=device), a, a.T, out_dtype=torch.float32, out=out)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return bool((out == 8).all())
