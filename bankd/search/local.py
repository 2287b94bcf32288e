"""LocalBank: a bank searched in this process, with BankClient's API.

The in-process twin of a remote bankd (exact inner-product search with numpy, or
torch on CUDA), for trainers on one machine, for tests, and as the reference the
remote path is measured against. It reads the same bank files but needs neither
faiss nor grpc: results equal a Flat bankd's (ties aside), whatever index the bank has.

    from bankd.search.local import LocalBank
    bank = LocalBank("bank/bank.faiss")
    hits = bank.search(keys, k=5, exclude_ids=[[3], [17]])
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from bankd import __version__
from bankd.search.topk import fetch_count, gather_values, select
from bankd.store.reader import Bank
from bankd_client import errors, tensors
from bankd_client.identity import EncoderFingerprint, fingerprint_encoder
from bankd_client.types import BankInfo, Hits, KeyFunctionSpec, SearchQuery, exclude_lists


class LocalBank:
    """A bank loaded into this process; same methods as ``bankd_client.BankClient``."""

    def __init__(
        self,
        index_path: str | os.PathLike,
        *,
        device: str = "cpu",
        verify: bool = False,
        max_k: int = 1024,
        chunk_rows: int = 262_144,
    ) -> None:
        self.bank = Bank.load(index_path, verify=verify, load_index=False)
        self.max_k = min(max_k, self.bank.entries)
        self.chunk_rows = chunk_rows
        self.device = device
        self._torch_keys = None
        if device != "cpu":
            import torch

            self._torch_keys = torch.from_numpy(np.asarray(self.bank.keys)).to(device)

    def close(self) -> None:
        pass

    def __enter__(self) -> LocalBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self, **_: Any) -> BankInfo:
        b = self.bank
        kf = b.key_function()
        return BankInfo(
            entries=b.entries,
            key_dim=b.key_dim,
            value_shape=b.value_shape,
            value_dtype="float16",
            index_type="exact (in-process)",
            metric=b.manifest.get("metric", "ip"),
            vision_encoder=b.fingerprint("vision_encoder"),
            text_encoder=b.fingerprint("text_encoder"),
            key_function=KeyFunctionSpec(kf[0].get("name", ""), kf[0], kf[1]) if kf else None,
            max_k=self.max_k,
            max_batch=1 << 20,
            bank_id=b.bank_id,
            server_version=__version__,
            search_device=self.device,
        )

    def _raw_search(self, queries: np.ndarray, fetch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._torch_keys is not None:
            import torch

            q = torch.from_numpy(queries).to(self._torch_keys.device)
            top = torch.topk(q @ self._torch_keys.T, fetch, dim=1)
            return top.values.cpu().numpy(), top.indices.cpu().numpy().astype(np.int64)
        best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
        best_r = np.zeros((len(queries), 0), dtype=np.int64)
        keys = self.bank.keys
        for start in range(0, len(keys), self.chunk_rows):  # bounded memory on big banks
            s = queries @ np.asarray(keys[start : start + self.chunk_rows]).T
            r = np.broadcast_to(np.arange(start, start + s.shape[1]), s.shape)
            s, r = np.concatenate([best_s, s], 1), np.concatenate([best_r, r], 1)
            top = np.argpartition(-s, min(fetch, s.shape[1]) - 1, axis=1)[:, :fetch]
            best_s, best_r = np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)
        order = np.argsort(-best_s, axis=1, kind="stable")
        return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_r, order, 1)

    def search(
        self,
        keys: Any,
        k: int = 5,
        *,
        exclude_ids: Any = None,
        with_values: bool = True,
        timeout: float | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Hits:
        """Exact top-k; same arguments, results and errors as ``BankClient.search``
        (nprobe / ef_search are refused, as a server refuses them on a Flat index)."""
        for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
            if value:
                raise errors.InvalidArgument(
                    f"{name} does not apply to this bank's index (exact search in process)"
                )
        q = tensors.as_numpy(keys, name="keys")
        if q.ndim != 2 or q.shape[1] != self.bank.key_dim or len(q) == 0:
            raise errors.InvalidArgument(
                f"keys must be [B, {self.bank.key_dim}] with B >= 1, got {list(q.shape)}"
            )
        if not np.isfinite(q).all():
            raise errors.InvalidArgument("keys contain NaN or inf")
        if not 1 <= k <= self.max_k:
            raise errors.InvalidArgument(f"k={k} is out of range; it must be 1..{self.max_k}")
        try:
            exclude = exclude_lists(exclude_ids, len(q))
        except ValueError as e:
            raise errors.InvalidArgument(str(e)) from None
        q = np.ascontiguousarray(q, dtype=np.float32)
        scores, rows = self._raw_search(q, fetch_count(k, exclude, self.bank.entries))
        res = select(self.bank.ids, scores, rows, k, exclude)
        values = gather_values(self.bank.values, res.rows) if with_values else None
        hits = Hits(res.ids, res.scores, values)
        return hits.to_torch() if tensors.is_torch_tensor(keys) else hits

    def stream_search(
        self,
        queries: Iterable[Any],
        k: int = 5,
        *,
        with_values: bool = True,
        timeout: float | None = None,
    ) -> Iterator[Hits]:
        for q in queries:
            if not isinstance(q, SearchQuery):
                q = SearchQuery(keys=q)
            yield self.search(q.keys, q.k or k, exclude_ids=q.exclude_ids, with_values=with_values)

    def fetch(self, ids: Any, *, with_keys: bool = False, timeout: float | None = None) -> Any:
        wanted = tensors.as_numpy(ids, name="ids").reshape(-1).astype(np.int64)
        rows = self.bank.rows_of(wanted)
        if (rows < 0).any():
            raise errors.NotFound(f"unknown entry ids: {wanted[rows < 0][:10].tolist()}")
        values = gather_values(self.bank.values, rows[None, :])[0]
        conv = tensors.to_torch if tensors.is_torch_tensor(ids) else (lambda a: a)
        if with_keys:
            return conv(values), conv(np.asarray(self.bank.keys[rows], dtype=np.float32))
        return conv(values)

    def check_encoder(
        self, encoder: Any, *, allow_mismatch: bool = False, model_id: str | None = None
    ) -> EncoderFingerprint:
        fp = (
            encoder
            if isinstance(encoder, EncoderFingerprint)
            else fingerprint_encoder(encoder, model_id)
        )
        bank_fp = self.bank.fingerprint("vision_encoder")
        if (bank_fp is None or not fp.matches(bank_fp)) and not allow_mismatch:
            theirs = bank_fp.short() if bank_fp else "an unrecorded encoder"
            raise errors.EncoderMismatch(
                f"encoder mismatch: the bank's keys come from {theirs}, "
                f"this encoder is {fp.short()}"
            )
        return fp
