"""A bank from embeddings a user already has: ``bankd import`` and ``import_bank``.

    bankd import --keys keys.npy --values values.npy --out bank/bank.faiss
    bankd import --keys emb.safetensors --values emb.safetensors --sources ids.json \\
        --index-type HNSW32 --ef-construction 80 --out bank/bank.faiss
    bankd serve --index bank/bank.faiss

From Python, with arrays in memory or memory-mapped::

    from bankd.build.importer import import_bank
    import_bank("bank/bank.faiss", keys, values, ids=ids)   # keys [N, d], values [N, ...]

Inputs: keys [N, d] and values [N, ...] (for the TinyAlign trainer [N, 32, 96]) as
``.npy`` or ``.safetensors`` files (of a file of several tensors, the one named like
the role, "keys" / "values" / "ids", or ``FILE.safetensors:NAME`` to choose one);
entry ids as int64 [N] (``--ids``), or as the samples' own ids (``--sources``: a JSON
list of N strings or integers, mapped by ``bankd_client.sample_id_to_int`` and kept
in the bank as its source ids), or 0..N-1 when neither is given.

Checked before anything is written, each with the file and row named: shapes and
counts, dtypes (floating keys and values; integer ids), NaN and inf (and values too
large for float16), negative ids (-1 marks "no hit" on the wire) and duplicate ids.
The index is built and tuned as ``bankd build`` builds it (``bankd.search.tuning``:
``auto`` chooses by N, d and the memory budget; every approximate index is tuned to
the recall target) and the bank is written by ``bankd.store.writer``, so ``bankd
serve`` serves it. Keys are searched by inner product as given (``--metric l2`` for
Euclidean): L2-normalise them first for cosine similarity. An imported bank has no
encoder, so its server answers Search and Fetch but not Embed.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bankd.build.config import BuildConfig, add_index_arguments
from bankd_client.identity import sample_id_to_int

CHUNK = 65_536  # rows checked and written at a time: memory stays bounded for any N
FP16_MAX = float(np.finfo(np.float16).max)
ROLES = ("keys", "values", "ids")


@dataclass(frozen=True)
class ImportConfig:
    """How the index is built; saved in the bank's manifest as its config."""

    index_factory: str = BuildConfig.index_factory  # factory string or "auto"
    metric: str = "ip"
    memory_budget: str = BuildConfig.memory_budget  # what "auto" may give the index
    recall_target: float | None = BuildConfig.recall_target  # None: FAISS's defaults
    recall_k: int = BuildConfig.recall_k
    ef_construction: int | None = None  # HNSW build depth; None: FAISS's (40)
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.metric not in ("ip", "l2"):
            raise ValueError(f"metric must be 'ip' or 'l2', got {self.metric!r}")
        if self.recall_target is not None and not 0 < self.recall_target <= 1:
            raise ValueError(f"recall_target must be in (0, 1], got {self.recall_target}")
        if self.recall_k < 1:
            raise ValueError(f"recall_k must be >= 1, got {self.recall_k}")
        if self.ef_construction is not None and self.ef_construction < 1:
            raise ValueError(f"ef_construction must be >= 1, got {self.ef_construction}")


# -- reading files ----------------------------------------------------------------------


def load_array(spec: str | Path, role: str) -> np.ndarray:
    """The array of a .npy file (memory-mapped) or of one tensor of a .safetensors file.

    ``spec`` is a path, or ``PATH:NAME`` for a named tensor of a safetensors file; a
    safetensors file of several tensors without a name gives the one named ``role``.
    """
    text = str(spec)
    path, name = Path(text), None
    if not path.exists() and ":" in text:
        head, name = text.rsplit(":", 1)
        path = Path(head)
    if not path.is_file():
        raise FileNotFoundError(f"--{role} {text}: no such file")
    if path.suffix == ".npy":
        if name is not None:
            raise ValueError(f"--{role} {text}: a .npy file holds one array; drop ':{name}'")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as e:  # object arrays, a broken header
            raise ValueError(f"--{role} {path}: not a plain numeric .npy array ({e})") from None
    if path.suffix == ".safetensors":
        return _safetensors_tensor(path, name, role)
    raise ValueError(f"--{role} {path}: expected a .npy or .safetensors file")


def _safetensors_tensor(path: Path, name: str | None, role: str) -> np.ndarray:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            names = list(f.keys())
            if name is None:
                name = names[0] if len(names) == 1 else role
            if name not in names:
                raise ValueError(
                    f"--{role} {path}: no tensor {name!r} (it holds {sorted(names)}); "
                    f"name one as {path}:NAME"
                )
            try:
                return f.get_tensor(name)
            except (TypeError, ValueError):  # numpy has no bfloat16
                pass
    except SafetensorError as e:
        raise ValueError(f"--{role} {path}: not a safetensors file ({e})") from None
    import torch  # bfloat16 tensors: read with torch, widened to float32
    from safetensors.torch import load_file

    return load_file(str(path))[name].to(torch.float32).numpy()


def load_sources(path: str | Path) -> list[str | int]:
    """A JSON list of sample ids (strings or integers), one per entry."""
    try:
        sources = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--sources {path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--sources {path}: not valid JSON ({e})") from None
    if not isinstance(sources, list):
        raise ValueError(f"--sources {path}: expected a JSON list of sample ids")
    return sources


# -- checks -----------------------------------------------------------------------------


def _rows(n: int, what: str, progress: bool) -> Any:
    starts = range(0, n, CHUNK)
    return tqdm(starts, desc=what, unit_scale=CHUNK, disable=not progress or n <= CHUNK)


def check_keys_values(keys: Any, values: Any, progress: bool = False) -> None:
    """ValueError naming the problem (and its first row) in keys [N, d] / values [N, ...]."""
    for role, a in (("keys", keys), ("values", values)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(f"{role} must be an array, got {type(a).__name__}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{role} must be floating point (float16/32/64), got {a.dtype}")
    if keys.ndim != 2 or keys.shape[0] < 1 or keys.shape[1] < 1:
        raise ValueError(f"keys must be [N, d] with N, d >= 1, got shape {list(keys.shape)}")
    if values.ndim < 2 or 0 in values.shape:
        raise ValueError(f"values must be [N, ...] (e.g. [N, 32, 96]), got {list(values.shape)}")
    if len(values) != len(keys):
        raise ValueError(f"{len(keys)} keys but {len(values)} values: one value per key")
    for start in _rows(len(keys), "checking", progress):
        k = np.asarray(keys[start : start + CHUNK])
        v = np.asarray(values[start : start + CHUNK])
        for role, a in (("keys", k), ("values", v)):
            bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1)
            if bad.any():
                row = start + int(np.flatnonzero(bad)[0])
                raise ValueError(f"{role} row {row} holds NaN or inf")
        big = (np.abs(v.reshape(len(v), -1)) > FP16_MAX).any(axis=1)
        if big.any():
            row = start + int(np.flatnonzero(big)[0])
            raise ValueError(f"values row {row} holds a number beyond float16's range (65504)")


def entry_ids(n: int, ids: Any = None, sources: list | None = None) -> np.ndarray:
    """The int64 entry id of each row: given ids, the sources' mapped ids, or 0..n-1."""
    if ids is not None and sources is not None:
        raise ValueError("give entry ids or sources, not both")
    if sources is not None:
        if len(sources) != n:
            raise ValueError(f"{len(sources)} sources for {n} entries")
        out = np.empty(n, dtype=np.int64)
        for row, sample in enumerate(sources):
            try:
                out[row] = sample_id_to_int(sample)
            except ValueError as e:
                raise ValueError(f"sources[{row}]: {e}") from None
        _refuse_duplicates(out, lambda r: f"sources[{r}] = {sources[r]!r}")
        return out
    if ids is None:
        return np.arange(n, dtype=np.int64)
    ids = np.asarray(ids)
    if ids.shape != (n,):
        raise ValueError(f"ids must be [N] = [{n}], got shape {list(ids.shape)}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"ids must be integers (int64), got {ids.dtype}")
    if ids.dtype == np.uint64 and (ids > np.iinfo(np.int64).max).any():
        row = int(np.flatnonzero(ids > np.iinfo(np.int64).max)[0])
        raise ValueError(f"ids[{row}] = {ids[row]} does not fit int64")
    out = ids.astype(np.int64)
    if (out < 0).any():
        row = int(np.flatnonzero(out < 0)[0])
        raise ValueError(f"ids[{row}] = {out[row]} is negative (-1 means 'no hit' on the wire)")
    _refuse_duplicates(out, lambda r: f"ids[{r}] = {out[r]}")
    return out


def _refuse_duplicates(ids: np.ndarray, name: Any) -> None:
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(same):
        first, second = int(order[same[0]]), int(order[same[0] + 1])
        more = f" (and {len(same) - 1} more)" if len(same) > 1 else ""
        raise ValueError(f"duplicate entry id: {name(first)} and {name(second)}{more}")


# -- the import -------------------------------------------------------------------------


def import_bank(
    out: str | Path,
    keys: Any,
    values: Any,
    ids: Any = None,
    *,
    sources: list | None = None,
    config: ImportConfig = ImportConfig(),
    inputs: dict[str, str] | None = None,
) -> Path:
    """Write a bank at ``out`` (``.../name.faiss``) from keys [N, d] and values [N, ...].

    keys, values: float arrays (numpy, memory-mapped, anything ``np.asarray`` reads);
    keys become float32, values float16. ids: int64 [N] entry ids, or sources: N sample
    ids (str or int, ``sample_id_to_int``), or neither (0..N-1). The index follows
    ``config`` (factory or "auto", memory budget, recall target, HNSW build depth).
    ValueError names any problem before a file is written; returns the index path.
    """
    from bankd.search.tuning import build_tuned, parse_bytes  # faiss only when writing
    from bankd.store.manifest import IndexRecord, Manifest
    from bankd.store.writer import BankWriter

    check_keys_values(keys, values, config.progress)
    ids = entry_ids(len(keys), ids, sources)
    source_ids = None if sources is None else [str(s) for s in sources]
    n, d = keys.shape
    budget = parse_bytes(config.memory_budget)
    with BankWriter(out, n_entries=n, key_dim=d, value_shape=tuple(values.shape[1:])) as w:
        for start in _rows(n, "writing", config.progress):
            end = start + CHUNK
            w.add(np.asarray(keys[start:end], np.float32), values[start:end], ids[start:end])
        w.check_complete(source_ids)
        index, described = build_tuned(
            w.keys,
            config.index_factory,
            config.metric,
            memory_budget_bytes=budget,
            recall_target=config.recall_target,
            recall_k=config.recall_k,
            seed=config.seed,
            ef_construction=config.ef_construction,
        )
        manifest = Manifest(
            index=IndexRecord.from_dict(described, config.index_factory),
            metric=config.metric,
            config={**asdict(config), "imported_from": inputs or {}},
            report={"entries": n, "imported": True},
        )
        return w.finish(index, manifest, source_ids=source_ids)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``bankd import``."""
    d = ImportConfig()
    add = parser.add_argument
    add("--keys", required=True, help="keys [N, d]: FILE.npy, FILE.safetensors[:TENSOR]")
    add("--values", required=True, help="values [N, ...] ([N, 32, 96] for TinyAlign), same forms")
    ids = parser.add_mutually_exclusive_group()
    ids.add_argument("--ids", help="int64 entry ids [N] (.npy/.safetensors); default 0..N-1")
    ids.add_argument(
        "--sources",
        help="JSON list of the N samples' ids (str or int), mapped to entry ids as "
        "bankd_client.sample_id_to_int does and kept in the bank",
    )
    add("--out", type=Path, required=True, help="index path, e.g. bank/bank.faiss")
    add_index_arguments(parser, ("--index-type", "--index"))
    add("--metric", choices=("ip", "l2"), default=d.metric, help="inner product or L2")
    add("--seed", type=int, default=d.seed, help="index training sample and recall queries")
    add("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``bankd import``; bad input raises ValueError / FileNotFoundError."""
    config = ImportConfig(
        index_factory=args.index_type,
        metric=args.metric,
        memory_budget=args.memory_budget,
        recall_target=args.recall_target or None,
        recall_k=args.recall_k,
        ef_construction=args.ef_construction,
        seed=args.seed,
        progress=not args.no_progress,
    )
    keys, values = load_array(args.keys, "keys"), load_array(args.values, "values")
    ids = load_array(args.ids, "ids") if args.ids else None
    sources = load_sources(args.sources) if args.sources else None
    inputs = {r: str(getattr(args, r)) for r in (*ROLES, "sources") if getattr(args, r)}
    path = import_bank(args.out, keys, values, ids, sources=sources, config=config, inputs=inputs)
    from bankd.store.reader import Bank

    index = Bank.load(path, verify=False, load_index=False).manifest.index
    print(
        f"import: wrote {len(keys)} entries to {path}; index {index.factory} "
        f"({index.reason or 'as asked'}), search params {index.search_params or 'none'}, "
        f"recall@{index.recall.get('k')} {index.recall.get('value')}"
    )
    return 0
