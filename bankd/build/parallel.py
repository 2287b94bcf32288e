"""``bankd build`` under torchrun: which rows each rank encodes, and how they meet again.

    torchrun --nproc_per_node 4 -m bankd build --data ... --out bank/bank.faiss
    torchrun --nproc_per_node 4 -m bankd build --data ... --out bank/bank.faiss --keep-shards

Rank 0 runs pass 1 and trains the Perceiver (or loads both from the work directory)
while the others wait, then sends the weights to every rank, so all ranks encode with
the same bits. Pass 2 is split into contiguous row ranges (``pass2_bounds``) whose
boundaries are multiples of the encoder batch: each rank encodes exactly the batches
one process would, so its keys and values are those of a one-process build, bit for
bit (same device type, torch thread count and kernels). Then either rank 0 receives
every rank's rows in row order (``send_rows`` / ``received_rows``) and writes one bank,
or, with ``--keep-shards``, each rank writes its range as shard r of W in the layout of
``bankd shard``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bankd.build.distributed import DistEnv
from bankd.build.workdir import BuildWorkDir
from bankd.search.shard import ALIGN_ROWS, aligned_bounds

# How long a collective waits: the other ranks wait while rank 0 trains the Perceiver
# and builds the index. A rank that fails ends the whole job through torchrun, so this
# only bounds a true hang.
COLLECTIVE_TIMEOUT = timedelta(hours=24)
ROWS_PER_MESSAGE = 4096  # rows sent at once to rank 0: 25 MB of (32, 96) fp16 values


def pass2_bounds(n: int, world_size: int, batch_size: int, *, shards: bool) -> list[int]:
    """Row boundaries [0, b1, ..., n] of each rank's part of pass 2, on batch multiples.

    One bank: the encoder batches are split evenly (a rank may get none). Shards: every
    shard non-empty, boundaries on multiples of ALIGN_ROWS as well when the bank is large
    enough (``bankd shard``'s alignment, for bit-identical flat-search scores).
    """
    if not shards:
        batches = -(-n // batch_size)
        return [min(n, batch_size * (batches * r // world_size)) for r in range(world_size + 1)]
    for align in (math.lcm(batch_size, ALIGN_ROWS), batch_size):
        if (bounds := aligned_bounds(n, world_size, align)) is not None:
            return bounds
    raise ValueError(
        f"--keep-shards: {n} entries make {-(-n // batch_size)} encoder batches of "
        f"{batch_size}, too few for {world_size} non-empty shards; "
        "lower --batch-size or run fewer processes"
    )


def shard_align(bounds: list[int], batch_size: int) -> int:
    """The row multiple the shard boundaries fall on (``bankd shard`` records it too)."""
    return ALIGN_ROWS if all(b % ALIGN_ROWS == 0 for b in bounds[1:-1]) else batch_size


def check_ranks_agree(env: DistEnv, facts: dict[str, Any]) -> None:
    """Raise ValueError on every rank when some rank's ``facts`` (config, data, encoder)
    differ from rank 0's: the ranks would encode different banks."""
    every = env.gather(facts)
    for rank, other in enumerate(every):
        changed = sorted(k for k in facts.keys() | other.keys() if every[0].get(k) != other.get(k))
        if changed:
            raise ValueError(
                f"rank {rank} of {env.world_size} disagrees with rank 0 on "
                f"{', '.join(changed)}: every rank must run the same command on the same "
                "data file and encoder"
            )


def on_rank0(env: DistEnv, fn: Any) -> Any:
    """``fn()`` run on rank 0; its result, or the ValueError it raised, on every rank."""
    result = None
    if env.is_main:
        try:
            result = fn()
        except ValueError as e:
            result = e
    result = env.broadcast(result)
    if isinstance(result, ValueError):
        raise result
    return result


def send_rows(env: DistEnv, keys: np.ndarray, values: np.ndarray) -> None:
    """Rank r > 0: its pass-2 rows to rank 0, ``ROWS_PER_MESSAGE`` at a time."""
    for s in range(0, len(keys), ROWS_PER_MESSAGE):
        for part in (keys[s : s + ROWS_PER_MESSAGE], values[s : s + ROWS_PER_MESSAGE]):
            dist.send(torch.from_numpy(np.array(part)).to(env.comm_device), dst=0)


def received_rows(
    env: DistEnv, src: int, n: int, key_dim: int, value_shape: tuple[int, ...]
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rank 0: the ``n`` rows rank ``src`` sends, as (keys (c, d), values (c, 32, 96))."""
    for s in range(0, n, ROWS_PER_MESSAGE):
        c = min(ROWS_PER_MESSAGE, n - s)
        keys = torch.empty((c, key_dim), dtype=torch.float32, device=env.comm_device)
        values = torch.empty((c, *value_shape), dtype=torch.float16, device=env.comm_device)
        dist.recv(keys, src=src)
        dist.recv(values, src=src)
        yield keys.cpu().numpy(), values.cpu().numpy()


def all_rows(
    env: DistEnv, own: Iterator[tuple], bounds: list[int], key_dim: int, value_shape: tuple
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rank 0: every rank's pass-2 rows in row order, its own (``own``) first."""
    yield from own
    for rank in range(1, env.world_size):
        n = bounds[rank + 1] - bounds[rank]
        yield from received_rows(env, rank, n, key_dim, value_shape)


def remove_checkpoints(env: DistEnv, work: BuildWorkDir | None, part: BuildWorkDir) -> None:
    """Once every rank committed its bank or shard: each rank's rows (``part``), then
    rank 0's work directory ``work``. A crash before this only costs committing again."""
    env.barrier()
    if not env.is_main:
        part.remove()
        with contextlib.suppress(OSError):  # empty unless rank 0 shares this file system
            part.path.parent.rmdir()
    env.barrier()
    if work is not None:
        work.remove()
