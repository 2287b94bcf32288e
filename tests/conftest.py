"""Shared fixtures: a seeded synthetic bank on disk, a real server on port 0, a client,
and `bankd serve` as a child process (``serve``) for tests that signal or kill it.

The bank's entry ids are a permutation of ``1000 + 7 * i`` (never ``0..N-1`` and not in
row order), so any code that confuses an entry id with a row number, or assumes ids
are sorted, returns wrong hits and fails the brute-force comparisons.
"""

from __future__ import annotations

import os

# faiss's OpenMP threads spin after each search; on a 2-core machine they starve the
# server's Python threads and a tiny search costs ~25 ms instead of ~1 ms. Passive
# waiting keeps the suite fast. Must be set before faiss (libgomp) is loaded.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import dataclasses
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

N_ENTRIES = 3000
KEY_DIM = 32
VALUE_SHAPE = (32, 96)
N_CLUSTERS = 24
SEED = 1234


@dataclasses.dataclass(frozen=True)
class SyntheticBank:
    """A bank written to disk together with the arrays it was written from."""

    path: Path
    keys: np.ndarray  # (N, d) float32, unit norm
    values: np.ndarray  # (N, *value_shape) float16
    ids: np.ndarray  # (N,) int64

    @functools.cached_property
    def row_of(self) -> dict[int, int]:
        return {int(e): r for r, e in enumerate(self.ids)}

    def queries(self, b: int, *, seed: int, dtype: Any = np.float32) -> np.ndarray:
        """b unit-norm query keys near the bank's clusters (B, d)."""
        rng = np.random.default_rng(seed)
        rows = rng.integers(0, len(self.keys), size=b)
        q = self.keys[rows] + 0.2 * rng.standard_normal((b, self.keys.shape[1]))
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        return q.astype(dtype)


def make_arrays(
    n: int = N_ENTRIES,
    d: int = KEY_DIM,
    value_shape: tuple[int, ...] = VALUE_SHAPE,
    seed: int = SEED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Clustered unit-norm keys (n, d), random fp16 values, permuted non-row ids."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((N_CLUSTERS, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    keys = centers[rng.integers(0, N_CLUSTERS, size=n)] + 0.35 * rng.standard_normal((n, d))
    keys = (keys / np.linalg.norm(keys, axis=1, keepdims=True)).astype(np.float32)
    values = rng.standard_normal((n, *value_shape), dtype=np.float32).astype(np.float16)
    ids = (1000 + 7 * rng.permutation(n)).astype(np.int64)
    return keys, values, ids


BankFactory = Callable[..., SyntheticBank]


@pytest.fixture
def make_bank(tmp_path: Path) -> BankFactory:
    """Write a fresh synthetic bank under tmp_path: make_bank(n=..., d=..., name=..., **finish)."""
    from bankd.store.writer import write_bank

    def factory(
        n: int = 200,
        d: int = 16,
        *,
        value_shape: tuple[int, ...] = VALUE_SHAPE,
        seed: int = 7,
        name: str = "bank",
        folder: Path | None = None,
        **finish_kwargs: Any,
    ) -> SyntheticBank:
        keys, values, ids = make_arrays(n, d, value_shape, seed)
        index = (folder or tmp_path / "banks") / f"{name}.faiss"
        path = write_bank(index, keys, values, ids, **finish_kwargs)
        return SyntheticBank(Path(path), keys, values, ids)

    return factory


@pytest.fixture(scope="session")
def bank(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBank:
    """The shared read-only bank: N=3000 entries, d=32, values (32, 96) fp16, Flat index."""
    from bankd.store.writer import write_bank

    keys, values, ids = make_arrays()
    path = write_bank(tmp_path_factory.mktemp("bank") / "bank.faiss", keys, values, ids)
    return SyntheticBank(Path(path), keys, values, ids)


@pytest.fixture(scope="session")
def encoder_bank(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBank:
    """A bank whose server embeds: N=3000, d=128, the tiny encoder's fingerprint and a
    key function of its width (no build: seconds), so Embed runs for real."""
    from bankd.models.encoders import load_encoder
    from bankd.models.keys import KeyFunction
    from bankd.store.writer import write_bank

    encoder = load_encoder("tiny", seed=0)
    key_function = KeyFunction(encoder.vision_dim)
    keys, values, ids = make_arrays(d=encoder.vision_dim)
    path = write_bank(
        tmp_path_factory.mktemp("encoder-bank") / "bank.faiss",
        keys,
        values,
        ids,
        vision_encoder=encoder.vision_fingerprint(),
        key_function={"config": key_function.to_config(), "weights": key_function.weights_bytes()},
        config={"seed": 0},  # the seed the server builds the tiny encoder with
    )
    return SyntheticBank(Path(path), keys, values, ids)


def _server(index: Path, **config: Any) -> Any:
    """An unstarted BankServer on loopback, port 0, /metrics on port 0, CPU search.

    Search runs on the CPU so scores are exact float32 (the torch CUDA path computes
    in fp16 and would need looser tolerances).
    """
    from bankd.serve.server import BankServer, ServerConfig

    config.setdefault("device", "cpu")
    config.setdefault("metrics_port", 0)
    return BankServer(ServerConfig(index=str(index), host="127.0.0.1", port=0, **config))


@pytest.fixture
def server_factory() -> Iterator[Callable[..., Any]]:
    """server_factory(index, load_in_background=False, **ServerConfig fields): a started
    server, stopped (grace 0) at the end of the test even when start() failed."""
    servers: list[Any] = []

    def factory(index: Path, *, load_in_background: bool = False, **config: Any) -> Any:
        srv = _server(index, **config)
        servers.append(srv)
        return srv.start(load_in_background=load_in_background)

    yield factory
    for srv in servers:
        srv.stop(grace=0)


@pytest.fixture
def client_factory() -> Iterator[Callable[..., Any]]:
    """BankClients to a port, closed at the end of the test."""
    from bankd_client import BankClient

    clients: list[Any] = []

    def factory(port: int, **kwargs: Any) -> Any:
        kwargs.setdefault("timeout", 30.0)
        c = BankClient(f"127.0.0.1:{port}", **kwargs)
        clients.append(c)
        return c

    yield factory
    for c in clients:
        c.close()


@pytest.fixture(scope="session")
def server(bank: SyntheticBank) -> Iterator[Any]:
    """A running server over the shared bank, default limits, for the whole session."""
    srv = _server(bank.path).start()
    yield srv
    srv.stop(grace=0)


@pytest.fixture(scope="session")
def client(server: Any) -> Iterator[Any]:
    """The real client connected to the shared server."""
    from bankd_client import BankClient

    with BankClient(f"127.0.0.1:{server.port}", timeout=30.0) as c:
        c.wait_ready(timeout=10)
        yield c


def brute_force(
    bank: SyntheticBank, queries: np.ndarray, exclude: list[list[int]] | None = None
) -> np.ndarray:
    """Inner products of every query with every bank key (B, N), float64; -inf if excluded."""
    scores = (
        np.asarray(queries, dtype=np.float32).astype(np.float64) @ bank.keys.astype(np.float64).T
    )
    if exclude:
        row_of = bank.row_of
        for b, ex in enumerate(exclude):
            rows = [row_of[e] for e in ex if e in row_of]
            scores[b, rows] = -np.inf
    return scores


def assert_topk(
    bank: SyntheticBank,
    queries: np.ndarray,
    k: int,
    ids: np.ndarray,
    scores: np.ndarray,
    exclude: list[list[int]] | None = None,
    atol: float = 1e-4,
) -> None:
    """ids/scores (B, k) are the exact top-k by inner product (near-ties may swap)."""
    ids, scores = np.asarray(ids), np.asarray(scores)
    b = len(queries)
    assert ids.shape == (b, k) and scores.shape == (b, k)
    assert ids.dtype == np.int64 and scores.dtype == np.float32
    full = brute_force(bank, queries, exclude)
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    expected_scores = np.take_along_axis(full, order, axis=1)
    expected_ids = bank.ids[order]
    np.testing.assert_allclose(scores, expected_scores, atol=atol, rtol=0)
    row_of = bank.row_of
    for i in range(b):
        assert len(set(ids[i].tolist())) == k, f"query {i}: repeated ids {ids[i]}"
        rows = [row_of.get(int(e), -1) for e in ids[i]]
        assert min(rows) >= 0, f"query {i}: ids not in the bank: {ids[i]}"
        # Each id's own brute-force score is the score returned with it.
        np.testing.assert_allclose(scores[i], full[i, rows], atol=atol, rtol=0)
        # Where the k-th and (k+1)-th scores are well apart, the id sets are equal.
        kth = np.sort(full[i])[::-1][: k + 1]
        if len(kth) <= k or kth[k - 1] - kth[k] > 2 * atol:
            assert set(ids[i].tolist()) == set(expected_ids[i].tolist()), f"query {i}"


def assert_same_hits(a: Any, b: Any, atol: float = 1e-5) -> None:
    """Two Hits for the same batch agree: ids (up to near-ties), scores, values."""
    np.testing.assert_allclose(np.asarray(a.scores), np.asarray(b.scores), atol=atol, rtol=0)
    ai, bi = np.asarray(a.ids), np.asarray(b.ids)
    sa = np.asarray(a.scores)
    for r in np.flatnonzero((ai != bi).any(axis=1)):
        # Only hits whose scores are near-equal to a neighbour may swap places.
        diff = np.flatnonzero(ai[r] != bi[r])
        gaps = np.abs(np.diff(sa[r]))
        near = {j for j in range(len(gaps)) if gaps[j] <= atol}
        assert all(j in near or j - 1 in near for j in diff), f"row {r}: {ai[r]} != {bi[r]}"
    if a.values is None or b.values is None:
        assert a.values is None and b.values is None
    elif (ai == bi).all():
        np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))


def values_of(bank: SyntheticBank, ids: np.ndarray) -> np.ndarray:
    """The written values of entry ids (any shape), in that shape + value_shape."""
    row_of = bank.row_of
    rows = np.array([row_of[int(e)] for e in np.asarray(ids).reshape(-1)], dtype=np.int64)
    return bank.values[rows].reshape(*np.asarray(ids).shape, *bank.values.shape[1:])


@pytest.fixture(scope="session")
def helpers() -> SimpleNamespace:
    """The comparison helpers above, for test modules (conftest is not imported by name)."""
    return SimpleNamespace(
        brute_force=brute_force,
        assert_topk=assert_topk,
        assert_same_hits=assert_same_hits,
        values_of=values_of,
    )


# -- `bankd serve` as a child process ----------------------------------------------------

START_TIMEOUT_S = 120.0  # generous: a busy 2-core machine; with --encoder, torch loads


@pytest.fixture
def serve() -> Iterator[Callable[..., Any]]:
    """serve(index, *flags, port=0): a started `bankd serve` child on loopback (CPU search,
    no /metrics, no Embed, then the flags), killed at the end; ``.wait_ready()`` waits
    until it serves (``bankd.serve.process.ServeProcess``)."""
    from bankd.serve.flags import ServerConfig
    from bankd.serve.process import ServeProcess

    started: list[ServeProcess] = []

    def start(index: Path, *args: str, port: int = 0) -> ServeProcess:
        config = ServerConfig(
            index=str(index), port=port, metrics_port=None, device="cpu", no_embed=True
        )
        p = ServeProcess(config, serve_args=args, wait_ready=False, start_timeout=START_TIMEOUT_S)
        started.append(p.start())
        return p

    yield start
    for p in started:
        p.kill()
