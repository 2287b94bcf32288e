"""The server's Search answers, serialized without protobuf objects in between.

A Search answer is mostly values: [B, k, 32, 96] fp16 is 3.9 MB at B=128, k=5 and
63 MB at B=1024, k=10. The protobuf runtime copies them once per step (array to
bytes, bytes into a Tensor, the Tensor into the response, the response into its
serialization). This module writes the bytes the .proto defines (byte for byte what
``SerializeToString`` gives; tests/client/test_wire.py checks it) directly: each part
of the message (framing and small fields as bytes, ids and scores as arrays, values
gathered from the bank into a fresh array by a ``Fill``) is laid out once, and the
parts are joined into the one bytes object gRPC sends: a single copy, in C
(``bytes.join``), of every byte. gRPC's Python API takes only ``bytes``, which
Python cannot write into after it exists; the join is the one copy that costs.
The client reads these answers with ``bankd_client.wire``.

    payload = search_response(ids, scores, values=Fill(shape, np.float16, gather_into))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from bankd_client import tensors
from bankd_client.wire import LEN, VARINT, InRegion


@dataclass(frozen=True)
class Fill:
    """A tensor written on demand: ``fill(out)`` gets a writable [*shape] array to fill."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fill: Callable[[np.ndarray], None]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


Values = np.ndarray | Fill | InRegion | None

# A message is written as a list of parts: bytes (framing, small fields), arrays and
# Fills. Lengths are known before anything is written.
Part = Any


def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64 two's complement, as protobuf writes negative int64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def _len_field(field: int, size: int) -> bytes:
    return _key(field, LEN) + varint(size)


def _size(parts: list[Part]) -> int:
    return sum(p.nbytes if isinstance(p, (np.ndarray, Fill)) else len(p) for p in parts)


def _tensor(field: int, data: np.ndarray | Fill | InRegion) -> list[Part]:
    """A Tensor message as field ``field`` of its parent."""
    dtype = np.dtype(data.dtype)
    code = tensors.wire_dtype(dtype)
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data, dtype=dtype.newbyteorder("<"))
    shape = b"".join(varint(int(s)) for s in data.shape)
    head = _key(1, VARINT) + varint(code)
    if shape:
        head += _len_field(2, len(shape)) + shape
    if data.nbytes:  # proto3 leaves empty bytes out
        head += _len_field(3, data.nbytes)
    body = [head, data] if data.nbytes else [head]
    return [_len_field(field, _size(body)), *body]


def _string(field: int, text: str) -> list[Part]:
    raw = text.encode()
    return [_len_field(field, len(raw)) + raw] if raw else []


def search_response_parts(
    ids: np.ndarray, scores: np.ndarray, request_id: str, values: Values
) -> list[Part]:
    """A SearchResponse as parts for ``write`` (values not gathered yet)."""
    parts = _tensor(1, np.asarray(ids, dtype=np.int64))
    parts += _tensor(2, np.asarray(scores, dtype=np.float32))
    if values is not None:
        parts += _tensor(3, values)
    parts += _string(4, request_id)
    if isinstance(values, InRegion):
        parts.append(_key(5, VARINT) + varint(1))
    return parts


def _buffer(part: Part) -> Any:
    """A part as a bytes-like object; a Fill is filled into a new array first."""
    if isinstance(part, Fill):
        out = np.empty(part.shape, dtype=np.dtype(part.dtype).newbyteorder("<"))
        part.fill(out)
        part = out
    if isinstance(part, np.ndarray):
        return memoryview(part.reshape(-1).view(np.uint8))
    return part


def write(parts: list[Part]) -> bytes:
    """The parts joined into one new bytes object (each byte copied once, in C)."""
    return b"".join([_buffer(p) for p in parts])


def search_response(
    ids: np.ndarray,
    scores: np.ndarray,
    request_id: str = "",
    values: Values = None,
) -> bytes:
    """A serialized SearchResponse (values: an array, a Fill, InRegion, or None)."""
    return write(search_response_parts(ids, scores, request_id, values))


def stream_response(
    request_id: str,
    ids: np.ndarray,
    scores: np.ndarray,
    values: Values = None,
) -> bytes:
    """A serialized SearchStreamResponse carrying a result."""
    result = search_response_parts(ids, scores, request_id, values)
    return write([*_string(1, request_id), _len_field(2, _size(result)), *result])
