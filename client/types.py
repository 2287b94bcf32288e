"""Domain objects of the wire contract; each owns its protobuf conversion.

Protobuf stops here: the client facade and the server's servicer call ``to_pb`` /
``from_pb``; everything else (index, store, trainer) sees these dataclasses and
numpy arrays.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import tensors
from .identity import EncoderFingerprint
from .proto import bankd_pb2 as pb


def fingerprint_to_pb(fp: EncoderFingerprint | None) -> pb.EncoderFingerprint | None:
    if fp is None:
        return None
    return pb.EncoderFingerprint(
        model_id=fp.model_id, config_sha256=fp.config_sha256, weights_sha256=fp.weights_sha256
    )


def fingerprint_from_pb(msg: pb.EncoderFingerprint) -> EncoderFingerprint | None:
    if not (msg.config_sha256 or msg.weights_sha256):
        return None
    return EncoderFingerprint(msg.model_id, msg.config_sha256, msg.weights_sha256)


@dataclass(frozen=True)
class KeyFunctionSpec:
    """How the bank turns patch features into keys: name, JSON config, safetensors weights."""

    name: str
    config: dict[str, Any]
    weights: bytes = b""

    def to_pb(self) -> pb.KeyFunction:
        return pb.KeyFunction(
            name=self.name,
            config_json=json.dumps(self.config, sort_keys=True),
            weights_safetensors=self.weights,
        )

    @classmethod
    def from_pb(cls, msg: pb.KeyFunction) -> KeyFunctionSpec | None:
        if not msg.name:
            return None
        return cls(msg.name, json.loads(msg.config_json or "{}"), bytes(msg.weights_safetensors))


@dataclass(frozen=True)
class BankInfo:
    """What a bank holds and the limits its server enforces."""

    entries: int
    key_dim: int
    value_shape: tuple[int, ...]
    value_dtype: str
    index_type: str
    metric: str
    vision_encoder: EncoderFingerprint | None
    text_encoder: EncoderFingerprint | None
    key_function: KeyFunctionSpec | None
    max_k: int
    max_batch: int
    bank_id: str
    server_version: str = ""
    embed_available: bool = False
    search_device: str = "cpu"
    max_message_bytes: int = 0
    nprobe: int = 0  # the bank's default nprobe (IVF); 0: the index has none
    ef_search: int = 0  # the bank's default efSearch (HNSW); 0: the index has none
    max_nprobe: int = 0  # largest nprobe a search may ask for
    max_ef_search: int = 0  # largest ef_search a search may ask for
    recall: float = 0.0  # recall@recall_k measured at build (1.0: exact); 0: not measured
    recall_k: int = 0
    search_engine: str = ""  # exact engine(s) of a flat index; see GetInfoResponse

    def to_pb(self) -> pb.GetInfoResponse:
        msg = pb.GetInfoResponse(
            entries=self.entries,
            key_dim=self.key_dim,
            value_shape=list(self.value_shape),
            value_dtype=pb.DTYPE_FLOAT16 if self.value_dtype == "float16" else pb.DTYPE_FLOAT32,
            index_type=self.index_type,
            metric=self.metric,
            max_k=self.max_k,
            max_batch=self.max_batch,
            bank_id=self.bank_id,
            server_version=self.server_version,
            embed_available=self.embed_available,
            search_device=self.search_device,
            max_message_bytes=self.max_message_bytes,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            max_nprobe=self.max_nprobe,
            max_ef_search=self.max_ef_search,
            recall=self.recall,
            recall_k=self.recall_k,
            search_engine=self.search_engine,
        )
        if self.vision_encoder is not None:
            msg.vision_encoder.CopyFrom(fingerprint_to_pb(self.vision_encoder))
        if self.text_encoder is not None:
            msg.text_encoder.CopyFrom(fingerprint_to_pb(self.text_encoder))
        if self.key_function is not None:
            msg.key_function.CopyFrom(self.key_function.to_pb())
        return msg

    @classmethod
    def from_pb(cls, msg: pb.GetInfoResponse) -> BankInfo:
        return cls(
            entries=msg.entries,
            key_dim=msg.key_dim,
            value_shape=tuple(msg.value_shape),
            value_dtype=tensors.DTYPE_NAMES.get(msg.value_dtype, "unspecified"),
            index_type=msg.index_type,
            metric=msg.metric,
            vision_encoder=fingerprint_from_pb(msg.vision_encoder),
            text_encoder=fingerprint_from_pb(msg.text_encoder),
            key_function=KeyFunctionSpec.from_pb(msg.key_function),
            max_k=msg.max_k,
            max_batch=msg.max_batch,
            bank_id=msg.bank_id,
            server_version=msg.server_version,
            embed_available=msg.embed_available,
            search_device=msg.search_device,
            max_message_bytes=msg.max_message_bytes,
            nprobe=msg.nprobe,
            ef_search=msg.ef_search,
            max_nprobe=msg.max_nprobe,
            max_ef_search=msg.max_ef_search,
            recall=msg.recall,
            recall_k=msg.recall_k,
            search_engine=msg.search_engine,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-able view for printing (the key function's weights left out)."""
        d = {k: v for k, v in self.__dict__.items() if k != "key_function"}
        d["value_shape"] = list(self.value_shape)
        for name in ("vision_encoder", "text_encoder"):
            fp = d[name]
            d[name] = fp.to_dict() if fp is not None else None
        if self.key_function is not None:
            d["key_function"] = {"name": self.key_function.name, **self.key_function.config}
        return d


@dataclass
class Hits:
    """Top-k results of B queries, best first.

    ids [B, k] int64 (-1 where an approximate index found fewer than k), scores
    [B, k] float32, values [B, k, 32, 96] float16 or None. numpy arrays, or torch
    tensors when the query keys were torch tensors.
    """

    ids: Any
    scores: Any
    values: Any = None
    request_id: str = ""

    @classmethod
    def from_pb(cls, msg: pb.SearchResponse) -> Hits:
        values = tensors.decode(msg.values, name="values") if msg.HasField("values") else None
        return cls(
            ids=tensors.decode(msg.ids, name="ids"),
            scores=tensors.decode(msg.scores, name="scores"),
            values=values,
            request_id=msg.request_id,
        )

    def to_pb(self) -> pb.SearchResponse:
        msg = pb.SearchResponse(
            ids=tensors.encode(self.ids, dtype=np.dtype("int64"), name="ids"),
            scores=tensors.encode(self.scores, dtype=np.dtype("float32"), name="scores"),
            request_id=self.request_id,
        )
        if self.values is not None:
            msg.values.CopyFrom(tensors.encode(self.values, name="values"))
        return msg

    def to_torch(self) -> Hits:
        """The same hits as torch tensors (sharing memory where possible)."""
        return Hits(
            ids=tensors.to_torch(self.ids),
            scores=tensors.to_torch(self.scores),
            values=None if self.values is None else tensors.to_torch(self.values),
            request_id=self.request_id,
        )

    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[0])


@dataclass(frozen=True)
class SearchQuery:
    """One batch for ``BankClient.stream_search``: keys [B, d] and optional exclusions."""

    keys: Any
    exclude_ids: Any = None
    k: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def exclude_lists(exclude_ids: Any, batch: int) -> list[list[int]] | None:
    """Per-query exclusion lists from None, B sequences of ids, or a [B] / [B, m] array."""
    if exclude_ids is None:
        return None
    if tensors.is_torch_tensor(exclude_ids) or isinstance(exclude_ids, np.ndarray):
        arr = tensors.as_numpy(exclude_ids, name="exclude_ids")
        if arr.ndim == 1:
            arr = arr[:, None]
        rows = [list(map(int, r)) for r in arr]
    else:
        rows = [list(map(int, r)) if r is not None else [] for r in exclude_ids]
    if len(rows) != batch:
        raise ValueError(f"exclude_ids has {len(rows)} rows for a batch of {batch} queries")
    return rows


def exclude_to_pb(exclude_ids: Any, batch: int) -> list[pb.ExcludeIds]:
    """Per-query exclusion lists as protobuf (empty when there are none)."""
    return [pb.ExcludeIds(ids=r) for r in exclude_lists(exclude_ids, batch) or []]
