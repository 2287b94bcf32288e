"""Timing on a GPU, and the limits of the GPU a search is measured against.

``gpu_ms`` times device work with CUDA events, ``wall_ms`` host calls with a
``torch.cuda.synchronize`` before every clock read; ``limits`` measures, on the bank's
own fp16 key matrix, the memory bandwidth (a device-to-device copy of it, and a read of
it) and the fp16 matrix-multiply throughput of the search's shape and of a square one.
With no CUDA device both fall back to the wall clock (bench/gpu_search.py --device cpu).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import torch


def sync() -> None:
    """Wait for the GPU's queued work (nothing to wait for without CUDA)."""
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


def limits(keys: torch.Tensor, b: int, reps: int) -> dict[str, float]:
    """Bandwidth and matmul throughput measured on keys (N, d) fp16 and b queries."""
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
