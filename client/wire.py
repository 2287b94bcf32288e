"""Reading Search answers off the wire without protobuf objects in between.

A Search answer is mostly values: [B, k, 32, 96] fp16 is 3.9 MB at B=128, k=5 and
63 MB at B=1024, k=10. Going through the protobuf runtime costs a copy per step (on
the way in, a fresh bytes object each time a field is read). This module reads the
bytes the .proto defines directly:

- the values are a read-only numpy view over the received bytes (ids and scores, 12
  bytes a hit, are copied out so that keeping them keeps nothing else);
- values the server wrote into the client's shared-memory region (``bankd_client.shm``)
  travel as their dtype and shape only (``InRegion``).

The server's side, writing the same bytes without protobuf objects, is
``bankd.serve.wire``. Nothing changes on the wire: clients in other languages keep
using the .proto.

    hits = read_search_response(payload)      # numpy views over payload
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from . import tensors
from .proto import bankd_pb2 as pb
from .types import Hits

LEN = 2  # wire type of length-delimited fields (messages, strings, bytes, packed)
VARINT = 0  # wire type of varints


@dataclass(frozen=True)
class InRegion:
    """Values written into the request's shared-memory region: the response carries
    their dtype and shape, and ``values_in_region``."""

    shape: tuple[int, ...]
    dtype: np.dtype

    nbytes = 0  # none of them in the message


@dataclass(frozen=True)
class StreamAnswer:
    """One SearchStreamResponse: the hits, or the error (gRPC code number and message)."""

    request_id: str
    hits: Hits | None = None
    error_code: int = 0
    error_message: str = ""


# -- reading ---------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated message (varint runs past the end)")
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, pos
        shift += 7
        if shift >= 70:
            raise ValueError("malformed varint (over 10 bytes)")


def _fields(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field, wire type, value or start, end) of each field of buf[start:end]:
    varints give their value as the third item, length-delimited fields their span."""
    pos = start
    while pos < end:
        key, pos = _read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise ValueError("malformed message (field number 0)")
        if wire_type == VARINT:
            value, pos = _read_varint(buf, pos, end)
            yield field, wire_type, value, pos
        elif wire_type == LEN:
            size, pos = _read_varint(buf, pos, end)
            if pos + size > end:
                raise ValueError("truncated message (a field runs past the end)")
            yield field, wire_type, pos, pos + size
            pos += size
        elif wire_type == 1:  # 64-bit: skipped (no such field here)
            pos += 8
        elif wire_type == 5:  # 32-bit
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} (field {field})")
    if pos != end:
        raise ValueError("truncated message (a fixed-size field runs past the end)")


def _signed(n: int) -> int:
    return n - (1 << 64) if n >= 1 << 63 else n


def _tensor_header(buf: bytes, start: int, end: int) -> tuple[int, list[int], int, int]:
    """dtype, shape and the data's span of a Tensor message in buf[start:end]."""
    dtype, shape, data = 0, [], (start, start)
    for field, wire_type, a, b in _fields(buf, start, end):
        if field == 1 and wire_type == VARINT:
            dtype = a
        elif field == 2 and wire_type == LEN:  # packed
            pos = a
            while pos < b:
                s, pos = _read_varint(buf, pos, b)
                shape.append(_signed(s))
        elif field == 2 and wire_type == VARINT:  # unpacked, also valid protobuf
            shape.append(_signed(a))
        elif field == 3 and wire_type == LEN:
            data = (a, b)
    return dtype, shape, *data


def _read_tensor(buf: bytes, start: int, end: int, name: str) -> np.ndarray:
    """Read-only numpy view of a Tensor message in buf[start:end]."""
    dtype, shape, a, b = _tensor_header(buf, start, end)
    return tensors.view(dtype, shape, buf, a, b - a, name=name)


def _read_in_region(buf: bytes, start: int, end: int) -> InRegion:
    """The dtype and shape of values in the request's region (the Tensor has no data)."""
    dtype, shape, a, b = _tensor_header(buf, start, end)
    if b != a:
        raise ValueError("values are marked as in the region but the response has data")
    if dtype == pb.DTYPE_BFLOAT16:  # numpy has none; the server writes fp16
        raise ValueError("values in a region must be float16 or float32, not bfloat16")
    shape = tensors.checked_shape(dtype, shape, name="values")
    return InRegion(shape, tensors.numpy_dtype(dtype, name="values"))


def _read_hits(buf: bytes, start: int, end: int) -> Hits:
    spans: dict[int, tuple[int, int]] = {}
    request_id, in_region = "", False
    for field, wire_type, a, b in _fields(buf, start, end):
        if field == 5 and wire_type == VARINT:
            in_region = bool(a)
        if wire_type != LEN:
            continue
        if field in (1, 2, 3):
            spans[field] = (a, b)
        elif field == 4:
            request_id = bytes(buf[a:b]).decode()
    empty = (start, start)  # an absent Tensor reads as the default one (and is refused)
    if 3 not in spans:
        values = None
    elif in_region:
        values = _read_in_region(buf, *spans[3])
    else:
        values = _read_tensor(buf, *spans[3], name="values")
    # ids and scores are copied out (12 bytes a hit): a caller keeping them, as callers
    # do, would otherwise keep the whole response, values and all, alive with them.
    return Hits(
        ids=_read_tensor(buf, *spans.get(1, empty), name="ids").copy(),
        scores=_read_tensor(buf, *spans.get(2, empty), name="scores").copy(),
        values=values,
        request_id=request_id,
    )


def read_search_response(data: bytes) -> Hits:
    """Hits of a serialized SearchResponse: values a read-only view over ``data`` (or
    ``InRegion`` when the server wrote them into the request's region)."""
    return _read_hits(data, 0, len(data))


def read_stream_response(data: bytes) -> StreamAnswer:
    """A serialized SearchStreamResponse; values a read-only view over ``data``."""
    request_id, outcome = "", None
    for field, wire_type, a, b in _fields(data, 0, len(data)):
        if wire_type != LEN:
            continue
        if field == 1:
            request_id = bytes(data[a:b]).decode()
        elif field in (2, 3):  # a oneof: the last one read wins
            outcome = (field, a, b)
    if outcome is None:
        raise ValueError("SearchStreamResponse carries neither a result nor an error")
    field, a, b = outcome
    if field == 2:
        return StreamAnswer(request_id, hits=_read_hits(data, a, b))
    code, message = _read_error(data, a, b)
    return StreamAnswer(request_id, error_code=code, error_message=message)


def _read_error(buf: bytes, start: int, end: int) -> tuple[int, str]:
    code, message = 0, ""
    for field, wire_type, a, b in _fields(buf, start, end):
        if field == 1 and wire_type == VARINT:
            code = _signed(a)
        elif field == 2 and wire_type == LEN:
            message = bytes(buf[a:b]).decode()
    return code, message


__all__ = ["InRegion", "StreamAnswer", "read_search_response", "read_stream_response"]
