"""The peers `bench/peers.py` compares bankd with: Milvus Lite and Chroma, each local.

Each backend loads the bank's keys (float32 [N, d], inner product) and values (fp16
[N, 32, 96], 6144 bytes an entry) into a store of its own under a given folder, and
answers a batch of queries with the top-k entry ids and their values decoded to a
(B, k, 32, 96) fp16 array, as bankd's client returns them.

How each stores the payload, the fairest way its local build offers:

* Milvus Lite 3 (in-process, what ``MilvusClient("x.db")`` starts) has no bytes,
  binary-vector or float16-vector field type; the value is a VARCHAR field holding its
  bytes in base64 (8192 characters), returned with ``output_fields``.
* Chroma has no bytes field either; the value is a metadata string (base64) whose
  inverted index is switched off (only returned, never filtered on). Documents would
  be full-text indexed, which makes inserting 8 KB strings about 20 times slower.

HNSW settings are the same everywhere: M=32 (FAISS's HNSW32), efConstruction 40
(FAISS's default for it), efSearch given by the caller.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bankd.store.paths import VALUE_SHAPE

HNSW_M = 32
EF_CONSTRUCTION = 40
INSERT_BATCH = 1000  # rows per insert call: about 11 MB of keys and base64 values
PAYLOAD_CHARS = 4 * (int(np.prod(VALUE_SHAPE)) * 2 + 2) // 3  # base64 of one value


def encode_value(value: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(value, dtype=np.float16).tobytes()).decode()


def decode_hits(rows: list[list[tuple[int, str]]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """[(entry id, base64 value)] per query -> ids (B, k) int64, values (B, k, 32, 96) fp16.

    A query with fewer than k hits gets id -1 and zero values in the missing places.
    """
    ids = np.full((len(rows), k), -1, dtype=np.int64)
    values = np.zeros((len(rows), k, *VALUE_SHAPE), dtype=np.float16)
    for b, row in enumerate(rows):
        for j, (entry, payload) in enumerate(row[:k]):
            ids[b, j] = entry
            values[b, j] = np.frombuffer(base64.b64decode(payload), np.float16).reshape(VALUE_SHAPE)
    return ids, values


def _batches(n: int, what: str) -> Iterator[range]:
    with tqdm(total=n, desc=what, unit="entries", mininterval=5.0, leave=False) as bar:
        for s in range(0, n, INSERT_BATCH):
            rows = range(s, min(n, s + INSERT_BATCH))
            yield rows
            bar.update(len(rows))


class MilvusLite:
    """A Milvus Lite collection with a FLAT or an HNSW index over the keys."""

    def __init__(self, folder: Path, index_type: str, ef_search: int) -> None:
        from pymilvus import MilvusClient

        self.client = MilvusClient(str(folder / "milvus.db"))
        self.index_type = index_type
        self.name = f"bank_{index_type.lower()}"
        self.search_params: dict[str, Any] = {"metric_type": "IP"}
        if index_type == "HNSW":
            self.search_params["params"] = {"ef": ef_search}

    def load(self, keys: np.ndarray, values: np.ndarray, ids: np.ndarray) -> None:
        from pymilvus import DataType

        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("key", DataType.FLOAT_VECTOR, dim=keys.shape[1])
        schema.add_field("value", DataType.VARCHAR, max_length=PAYLOAD_CHARS)
        index = self.client.prepare_index_params()
        hnsw = {"M": HNSW_M, "efConstruction": EF_CONSTRUCTION}
        params = hnsw if self.index_type == "HNSW" else {}
        index.add_index("key", index_type=self.index_type, metric_type="IP", params=params)
        self.client.create_collection(self.name, schema=schema, index_params=index)
        for rows in _batches(len(keys), f"milvus {self.index_type}"):
            chunk = np.asarray(keys[rows.start : rows.stop], dtype=np.float32)
            data = [
                {"id": int(ids[r]), "key": chunk[i], "value": encode_value(values[r])}
                for i, r in enumerate(rows)
            ]
            self.client.insert(self.name, data)
        self.client.flush(self.name)
        self.client.load_collection(self.name)
        while self.client.describe_index(self.name, "key").get("pending_index_rows", 0):
            time.sleep(0.5)

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, str]]]:
        res = self.client.search(
            self.name,
            data=queries,
            limit=k,
            output_fields=["value"],
            search_params=self.search_params,
        )
        return [[(h["id"], h["entity"]["value"]) for h in row] for row in res]

    def close(self) -> None:
        self.client.close()


class Chroma:
    """A persistent local Chroma collection (HNSW, inner product)."""

    def __init__(self, folder: Path, ef_search: int) -> None:
        import chromadb
        from chromadb.config import Settings

        self.client = chromadb.PersistentClient(
            path=str(folder / "chroma"), settings=Settings(anonymized_telemetry=False)
        )
        self.ef_search = ef_search

    def load(self, keys: np.ndarray, values: np.ndarray, ids: np.ndarray) -> None:
        from chromadb import HnswIndexConfig, Schema, StringInvertedIndexConfig, VectorIndexConfig

        hnsw = HnswIndexConfig(
            max_neighbors=HNSW_M, ef_construction=EF_CONSTRUCTION, ef_search=self.ef_search
        )
        schema = (
            Schema()
            .create_index(VectorIndexConfig(space="ip", embedding_function=None, hnsw=hnsw))
            .delete_index(StringInvertedIndexConfig(), key="value")
        )
        self.collection = self.client.create_collection(
            "bank", schema=schema, embedding_function=None
        )
        for rows in _batches(len(keys), "chroma HNSW"):
            self.collection.add(
                ids=[str(int(ids[r])) for r in rows],
                embeddings=np.asarray(keys[rows.start : rows.stop], dtype=np.float32),
                metadatas=[{"value": encode_value(values[r])} for r in rows],
            )

    def search(self, queries: np.ndarray, k: int) -> list[list[tuple[int, str]]]:
        res = self.collection.query(query_embeddings=queries, n_results=k, include=["metadatas"])
        return [
            [(int(i), m["value"]) for i, m in zip(ids, metas, strict=True)]
            for ids, metas in zip(res["ids"], res["metadatas"], strict=True)
        ]

    def close(self) -> None:
        self.client.clear_system_cache()


# name -> (what it needs imported, how to build it from (folder, ef_search))
PEERS: dict[str, tuple[str, Any]] = {
    "milvus_flat": ("milvus_lite", lambda folder, ef: MilvusLite(folder, "FLAT", ef)),
    "milvus_hnsw": ("milvus_lite", lambda folder, ef: MilvusLite(folder, "HNSW", ef)),
    "chroma_hnsw": ("chromadb", lambda folder, ef: Chroma(folder, ef)),
}
PEER_GROUPS = {"milvus": ("milvus_flat", "milvus_hnsw"), "chroma": ("chroma_hnsw",)}
