"""Tensors on the wire: dtype + shape + raw little-endian row-major bytes.

Decoding is a view over the received bytes (no copy) and validates that the byte
count matches the shape; torch tensors are converted when torch is installed,
without importing it otherwise.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

from .proto import bankd_pb2 as pb

# numpy has no bfloat16: on the wire it is the upper 16 bits of a float32, and it is
# decoded to float32 (values are sent as fp16 by default, so this is the rare path).
_NUMPY_BY_DTYPE = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_BFLOAT16: np.dtype("<u2"),
}
_DTYPE_BY_NUMPY = {
    np.dtype("float32"): pb.DTYPE_FLOAT32,
    np.dtype("float16"): pb.DTYPE_FLOAT16,
    np.dtype("int64"): pb.DTYPE_INT64,
}
DTYPE_NAMES = {v: pb.DType.Name(v).removeprefix("DTYPE_").lower() for v in pb.DType.values()}
MAX_DIMS = 8


def _torch_module() -> Any | None:
    """torch if the caller already imported it (never imports it ourselves)."""
    return sys.modules.get("torch")


def is_torch_tensor(x: Any) -> bool:
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def as_numpy(x: Any, *, name: str = "tensor") -> np.ndarray:
    """numpy view of a numpy array, torch tensor (any device) or nested list."""
    if is_torch_tensor(x):
        torch = _torch_module()
        t = x.detach()
        if t.dtype == torch.bfloat16:
            t = t.to(torch.float32)
        return t.cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as e:  # ragged lists and the like
        raise ValueError(f"{name} is not array-like: {e}") from None


def wire_dtype(dtype: np.dtype, *, name: str = "tensor") -> int:
    """The DType number of a numpy dtype (any byte order)."""
    wire = _DTYPE_BY_NUMPY.get(np.dtype(np.dtype(dtype).name))
    if wire is None:
        raise ValueError(f"{name} has dtype {dtype}; supported: float32, float16, int64")
    return wire


def encode(array: Any, *, dtype: np.dtype | None = None, name: str = "tensor") -> pb.Tensor:
    """Tensor message from an array (optionally cast to dtype first)."""
    a = as_numpy(array, name=name)
    if dtype is not None and a.dtype != dtype:
        a = a.astype(dtype)
    wire = wire_dtype(a.dtype, name=name)
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return pb.Tensor(dtype=wire, shape=list(a.shape), data=a.tobytes())


def decode(t: pb.Tensor, *, name: str = "tensor") -> np.ndarray:
    """Read-only numpy view of a Tensor message's bytes, validated against its shape."""
    data = t.data  # each read of a bytes field makes a fresh copy: read it once
    return view(t.dtype, t.shape, data, 0, len(data), name=name)


def numpy_dtype(dtype: int, *, name: str = "tensor") -> np.dtype:
    """The numpy dtype of a DType number's bytes (bfloat16: its uint16 bit patterns)."""
    np_dtype = _NUMPY_BY_DTYPE.get(dtype)
    if np_dtype is None:
        raise ValueError(f"{name} has unsupported dtype {dtype} ({DTYPE_NAMES.get(dtype, '?')})")
    return np_dtype


def checked_shape(dtype: int, shape: Any, *, name: str = "tensor") -> tuple[int, ...]:
    """shape as a tuple of ints; ValueError for an unsupported dtype or invalid shape."""
    numpy_dtype(dtype, name=name)
    shape = tuple(int(s) for s in shape)
    if len(shape) > MAX_DIMS or any(s < 0 for s in shape):
        raise ValueError(f"{name} has invalid shape {list(shape)}")
    return shape


def view(
    dtype: int, shape: Any, buffer: Any, offset: int, nbytes: int, *, name: str = "tensor"
) -> np.ndarray:
    """Read-only numpy view of ``nbytes`` at ``offset`` in ``buffer`` holding a tensor of
    DType ``dtype`` and ``shape``; the byte count is checked against the shape."""
    shape = checked_shape(dtype, shape, name=name)
    np_dtype = numpy_dtype(dtype, name=name)
    expected = math.prod(shape) * np_dtype.itemsize  # exact: np.prod wraps around at 2**63
    if nbytes != expected:
        raise ValueError(
            f"{name} has {nbytes} bytes but shape {list(shape)} of "
            f"{DTYPE_NAMES[dtype]} needs {expected}"
        )
    try:
        a = np.frombuffer(
            buffer, dtype=np_dtype, count=expected // np_dtype.itemsize, offset=offset
        )
        a = a.reshape(shape)
    except ValueError as e:  # an empty tensor whose other dimensions numpy cannot hold
        raise ValueError(f"{name} has invalid shape {list(shape)} ({e})") from None
    if dtype == pb.DTYPE_BFLOAT16:
        a = (a.astype(np.uint32) << 16).view(np.float32)
    return a


def to_torch(a: np.ndarray) -> Any:
    """torch tensor sharing memory with a (copied only when a is read-only)."""
    torch = _torch_module()
    if torch is None:  # pragma: no cover - callers check first
        import torch
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)
