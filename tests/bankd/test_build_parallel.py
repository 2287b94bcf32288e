"""``bankd build`` on 2 processes (Gloo, CPU): the bank equals a one-process build's bit
for bit, ``--keep-shards`` writes what ``bankd shard`` writes, interrupted builds resume.

Real runs: ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m bankd
build`` in a subprocess, and, where a test must stop one rank at a chosen point,
``torch.multiprocessing.spawn`` with a Gloo group calling ``build_bank`` in each
process. Tiny encoder, 200 demo pairs, batch 32 (rank 0 encodes rows 0-96, rank 1
rows 96-200), 3 Perceiver steps, one torch thread per process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch.multiprocessing as mp

from bankd.build.config import BuildConfig
from bankd.build.demo_data import DemoDataConfig, generate
from bankd.build.parallel import pass2_bounds
from bankd.build.pipeline import build_bank
from bankd.search.shard import split_bank
from bankd.store.reader import Bank

N = 200
FLAGS = ("--workers", "0", "--batch-size", "32", "--perceiver-steps", "3", "--threads", "1")
FLAGS += ("--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate(DemoDataConfig(out=out, n=N, heldout=0, seed=0), progress=False)
    return out


def _config(demo: Path, out: Path, **kw: Any) -> BuildConfig:
    """The BuildConfig that ``bankd build --data ... --out out FLAGS`` makes."""
    base = dict(
        data=demo / "data.json",
        image_folder=demo,
        out=out,
        workers=0,
        batch_size=32,
        perceiver_steps=3,
        threads=1,
        device="cpu",
        progress=False,
    )
    return BuildConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def single(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process build every test compares against."""
    return build_bank(_config(demo, tmp_path_factory.mktemp("single") / "bank.faiss"))


def _torchrun(demo: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
    argv += ["2", "-m", "bankd", "build", "--data", str(demo / "data.json")]
    argv += ["--image-folder", str(demo), "--out", str(out), *FLAGS, *flags]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    run = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _files(path: Path) -> dict[str, dict]:
    """Size and SHA-256 of every file of a bank but its manifest."""
    return Bank.load(path).manifest["files"]


def test_pass2_bounds() -> None:
    # One bank: the 7 batches split evenly, boundaries on batch multiples.
    assert pass2_bounds(200, 2, 32, shards=False) == [0, 96, 200]
    assert pass2_bounds(200, 3, 32, shards=False) == [0, 64, 128, 200]
    assert pass2_bounds(40, 3, 32, shards=False) == [0, 0, 32, 40]  # a rank may get none
    # Shards: on multiples of 4096 (bankd's flat-search block) where the bank allows (as
    # `bankd shard`), else of the batch, never empty.
    assert pass2_bounds(100_000, 4, 64, shards=True) == [0, 24576, 49152, 73728, 100_000]
    assert pass2_bounds(100_000, 2, 128, shards=True) == [0, 49152, 100_000]
    assert pass2_bounds(100_000, 2, 100, shards=True) == [0, 50000, 100_000]  # lcm 102400
    assert pass2_bounds(200, 2, 32, shards=True) == [0, 96, 200]
    with pytest.raises(ValueError, match="too few for 3 non-empty shards"):
        pass2_bounds(40, 3, 32, shards=True)


def test_torchrun_build_equals_one_process_build(demo: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "bank.faiss"
    run = _torchrun(demo, out)
    assert run.stdout.count(f"build: wrote {N} entries to {out}") == 1  # rank 0 alone
    assert "INFO [rank 0]" in run.stderr and "INFO [rank 1]" not in run.stderr
    assert _files(out) == _files(single)  # keys, values, ids, index, weights, sources
    a, b = Bank.load(single), Bank.load(out)
    assert np.asarray(a.keys).tobytes() == np.asarray(b.keys).tobytes()
    assert np.asarray(a.values).tobytes() == np.asarray(b.values).tobytes()
    np.testing.assert_array_equal(a.ids, b.ids)
    assert b.manifest["config"]["world_size"] == 2
    assert b.manifest["report"]["perceiver"] == a.manifest["report"]["perceiver"]
    assert not (tmp_path / "bank.partial").exists()


def test_keep_shards_writes_what_bankd_shard_writes(
    demo: Path, single: Path, tmp_path: Path, helpers: Any
) -> None:
    from bankd.serve.server import BankServer, ServerConfig
    from bankd_client import BankClient, ShardedBankClient

    run = _torchrun(demo, tmp_path / "bank.faiss", "--keep-shards")
    paths = [tmp_path / f"bank-{i}-of-2.faiss" for i in range(2)]
    assert f"build: wrote {N} entries to 2 shards, {paths[0]}, {paths[1]}" in run.stdout
    assert not (tmp_path / "bank.faiss").exists() and not (tmp_path / "bank.partial").exists()
    full = Bank.load(single)
    for i, path in enumerate(paths):
        shard = Bank.load(path).manifest["config"]["shard"]
        lo, hi = shard["rows"]
        assert (shard["index"], shard["of"], shard["align_rows"]) == (i, 2, 32)
        np.testing.assert_array_equal(Bank.load(path).keys, full.keys[lo:hi])
        np.testing.assert_array_equal(Bank.load(path).values, full.values[lo:hi])
        np.testing.assert_array_equal(Bank.load(path).ids, full.ids[lo:hi])
    # The same files as splitting the one-process bank on the same boundaries.
    split = split_bank(single, 2, tmp_path / "split", align_rows=32)
    assert [_files(p) for p in split] == [_files(p) for p in paths]

    servers = [
        BankServer(
            ServerConfig(index=str(p), port=0, metrics_port=None, device="cpu", no_embed=True)
        ).start()
        for p in [single, *paths]
    ]
    try:
        with (
            BankClient(f"127.0.0.1:{servers[0].port}", timeout=30) as one,
            ShardedBankClient([f"127.0.0.1:{s.port}" for s in servers[1:]], timeout=30) as two,
        ):
            assert two.info().entries == N
            rng = np.random.default_rng(0)
            rows = rng.integers(0, N, size=16)
            q = full.keys[rows] + 0.1 * rng.standard_normal((16, full.key_dim))
            q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
            exclude = [[int(full.ids[r])] for r in rows]
            want = one.search(q, k=5, exclude_ids=exclude, with_values=True)
            got = two.search(q, k=5, exclude_ids=exclude, with_values=True)
            helpers.assert_same_hits(got, want)
            assert not (got.ids == np.asarray(exclude)).any()  # each query's own entry
    finally:
        for s in servers:
            s.stop(grace=0)


# -- interrupted builds: torch.multiprocessing, one rank stopped after its first chunk ---


class Interrupted(RuntimeError):
    """A rank stopped mid-pass-2 (kill -9 or a lost node, as far as the others can tell)."""


def _rank_main(rank: int, port: int, configs: list[BuildConfig], stop_rank: int | None) -> None:
    """One rank of a Gloo job: ``build_bank(configs[rank])``."""
    from bankd.build.distributed import init_distributed
    from bankd.build.workdir import RowAppender

    world = str(len(configs))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=world)
    os.environ.update(LOCAL_WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if rank == stop_rank:
        append = RowAppender.append

        def once(self: RowAppender, keys: np.ndarray, values: np.ndarray) -> None:
            append(self, keys, values)
            raise Interrupted(f"rank {rank} stopped after its first chunk")

        RowAppender.append = once
    env = init_distributed("cpu")
    try:
        build_bank(configs[rank], env=env)
    finally:
        env.close()


def _spawn(configs: list[BuildConfig], stop_rank: int | None = None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_main, args=(port, configs, stop_rank), nprocs=len(configs), join=True)


def _interrupted(demo: Path, out: Path) -> Path:
    """A 2-process build of ``out`` stopped once rank 1 wrote rows 96-128; its rows dir."""
    with pytest.raises((mp.ProcessRaisedException, mp.ProcessExitedException)):
        _spawn([_config(demo, out)] * 2, stop_rank=1)
    part = out.parent / "bank.partial" / "rank-1-of-2"
    assert '"rows_done": 32' in (part / "state.json").read_text()
    assert '"trained"' in (out.parent / "bank.partial" / "state.json").read_text()
    return part


def test_interrupted_torchrun_build_resumes(demo: Path, single: Path, tmp_path: Path) -> None:
    out = tmp_path / "bank.faiss"
    part = _interrupted(demo, out)
    # Mark rank 1's saved first row (row 96) to see it reused, not encoded again; and a
    # chunk written but not counted (killed between the two) that must be cut off.
    keys = np.memmap(part / "keys.f32", np.float32, "r+", shape=(32, 128))
    keys[0] *= -1
    keys.flush()
    del keys
    with open(part / "keys.f32", "ab") as f:
        f.write(b"\x7f" * 4 * 128 * 5)

    run = _torchrun(demo, out)
    assert "resuming: key function and Perceiver" in run.stderr
    a, b = Bank.load(single), Bank.load(out)
    want = np.array(a.keys)
    want[96] *= -1
    np.testing.assert_array_equal(b.keys, want)
    np.testing.assert_array_equal(b.values, a.values)
    np.testing.assert_array_equal(b.ids, a.ids)
    assert b.manifest["report"]["perceiver"] == a.manifest["report"]["perceiver"]
    assert not (tmp_path / "bank.partial").exists()


def test_another_world_size_keeps_training_and_redoes_pass2(
    demo: Path, single: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "bank.faiss"
    _interrupted(demo, out)
    caplog.set_level("INFO", logger="bankd")
    resumed = build_bank(_config(demo, out))  # one process
    assert "resuming: key function and Perceiver" in caplog.text
    assert re.search(r"discarding the pass-2 rows .*rank-0-of-2, rank-1-of-2", caplog.text)
    assert _files(resumed) == _files(single)
    assert not (tmp_path / "bank.partial").exists()


def test_ranks_that_disagree_stop_before_building(demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "bank.faiss"
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 of 2 disagrees .* on seed"):
        _spawn([_config(demo, out), _config(demo, out, seed=1)])
    assert not (tmp_path / "bank.partial").exists()
