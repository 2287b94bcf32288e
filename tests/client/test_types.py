"""Tests of bankd_client's parts on their own: wire tensors, domain types and their
protobuf conversions, encoder identities and sample ids.

The error family and BankClient against a scripted server are in test_client_fake.py;
the client against the real server, in tests/bankd/test_server_*.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest

from bankd_client import (
    BankInfo,
    EncoderFingerprint,
    Hits,
    fingerprint_encoder,
    sample_id_to_int,
    tensors,
)
from bankd_client.proto import bankd_pb2 as pb
from bankd_client.types import exclude_to_pb

# -- tensors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.linspace(-2, 2, 24, dtype=np.float16).reshape(2, 3, 4),
        np.array([-(2**62), -1, 0, 2**62], dtype=np.int64),
        np.zeros((0, 32), np.float32),
    ],
    ids=["f32", "f16", "i64", "empty"],
)
def test_tensor_round_trip(array: np.ndarray) -> None:
    t = tensors.encode(array)
    assert list(t.shape) == list(array.shape)
    assert len(t.data) == array.nbytes
    out = tensors.decode(pb.Tensor.FromString(t.SerializeToString()))
    assert out.dtype == array.dtype and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert not out.flags.writeable  # a view over the message bytes


def test_tensor_bytes_are_little_endian_row_major() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3).T  # not C-contiguous
    t = tensors.encode(a)
    assert t.data == np.ascontiguousarray(a).astype("<f4").tobytes()
    assert t.dtype == pb.DTYPE_FLOAT32
    np.testing.assert_array_equal(tensors.decode(t), a)


def test_tensor_big_endian_input_is_converted() -> None:
    a = np.arange(6, dtype=">f4").reshape(2, 3)
    np.testing.assert_array_equal(tensors.decode(tensors.encode(a)), a)


def test_tensor_encode_casts_and_refuses_unsupported_dtypes() -> None:
    t = tensors.encode(np.ones((2, 2)), dtype=np.dtype("float16"))
    assert t.dtype == pb.DTYPE_FLOAT16 and len(t.data) == 8
    with pytest.raises(ValueError, match="float64"):
        tensors.encode(np.ones(3, np.float64), name="keys")
    with pytest.raises(ValueError, match="not array-like"):
        tensors.as_numpy([[1, 2], [3]], name="keys")


@pytest.mark.parametrize(
    "tensor, message",
    [
        (
            pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], data=b"\0" * 20),
            r"20 bytes.*\[2, 3\].*24",
        ),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT16, shape=[4], data=b"\0" * 16), r"16 bytes.*8"),
        (pb.Tensor(dtype=pb.DTYPE_UNSPECIFIED, shape=[1], data=b"\0" * 4), r"unsupported dtype"),
        (pb.Tensor(dtype=99, shape=[1], data=b"\0" * 4), r"unsupported dtype"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, 2], data=b""), r"invalid shape"),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 9, data=b"\0" * 4), r"invalid shape"),
        # element counts past 2**63 (np.prod would wrap around to a small number)
        (
            pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**40, 2**40], data=b"\0" * 256),
            rf"256 bytes.*needs {4 * 2**80}",
        ),
        (pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**62, 2**62, 0], data=b""), r"invalid shape"),
    ],
)
def test_tensor_decode_validates(tensor: pb.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tensors.decode(tensor, name="keys")


def test_tensor_bfloat16_decodes_to_float32() -> None:
    f = np.array([1.0, -2.5, 3.140625, 0.0], np.float32)
    upper = (f.view(np.uint32) >> 16).astype("<u2")
    out = tensors.decode(pb.Tensor(dtype=pb.DTYPE_BFLOAT16, shape=[4], data=upper.tobytes()))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, f)


def test_tensor_torch_conversion() -> None:
    torch = pytest.importorskip("torch")
    x = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    a = tensors.as_numpy(x)
    assert a.dtype == np.float32 and a.shape == (2, 3)
    assert tensors.is_torch_tensor(x) and not tensors.is_torch_tensor(a)
    view = tensors.decode(tensors.encode(np.ones((2, 2), np.float16)))
    t = tensors.to_torch(view)  # read-only view: copied, so the tensor is writable
    t += 1
    assert t.dtype == torch.float16 and float(t.sum()) == 8


# -- domain types ----------------------------------------------------------------------


def test_bank_info_round_trip(make_info: Callable[..., BankInfo]) -> None:
    info = make_info()
    msg = pb.GetInfoResponse.FromString(info.to_pb().SerializeToString())
    assert BankInfo.from_pb(msg) == info
    bare = make_info(vision_encoder=None, text_encoder=None, key_function=None)
    assert BankInfo.from_pb(bare.to_pb()) == bare
    summary = info.summary()
    json.dumps(summary)  # JSON-able, weights left out
    assert summary["key_function"] == {"name": "attnpool-v1", "dim": 32}


def test_hits_round_trip() -> None:
    rng = np.random.default_rng(0)
    hits = Hits(
        ids=np.array([[7, -1]], np.int64),
        scores=np.array([[0.5, -np.inf]], np.float32),
        values=rng.standard_normal((1, 2, 32, 96)).astype(np.float16),
        request_id="r1",
    )
    back = Hits.from_pb(pb.SearchResponse.FromString(hits.to_pb().SerializeToString()))
    np.testing.assert_array_equal(back.ids, hits.ids)
    np.testing.assert_array_equal(back.scores, hits.scores)
    np.testing.assert_array_equal(back.values, hits.values)
    assert back.request_id == "r1" and back.batch_size == 1
    no_values = Hits.from_pb(Hits(hits.ids, hits.scores).to_pb())
    assert no_values.values is None


def test_exclude_to_pb_forms() -> None:
    assert exclude_to_pb(None, 3) == []
    rows = exclude_to_pb([[1, 2], None, []], 3)
    assert [list(r.ids) for r in rows] == [[1, 2], [], []]
    rows = exclude_to_pb(np.array([4, 5]), 2)  # one own id per query
    assert [list(r.ids) for r in rows] == [[4], [5]]
    rows = exclude_to_pb(np.array([[4, 6], [5, 7]]), 2)
    assert [list(r.ids) for r in rows] == [[4, 6], [5, 7]]
    with pytest.raises(ValueError, match="2 rows for a batch of 3"):
        exclude_to_pb([[1], [2]], 3)


def test_exclude_to_pb_torch() -> None:
    torch = pytest.importorskip("torch")
    rows = exclude_to_pb(torch.tensor([9, 8]), 2)
    assert [list(r.ids) for r in rows] == [[9], [8]]


# -- identities ------------------------------------------------------------------------


def test_sample_id_to_int() -> None:
    assert sample_id_to_int("00017") == 17 == sample_id_to_int(17)
    h = sample_id_to_int("GCC_train_000123456.jpg")
    assert h == sample_id_to_int("GCC_train_000123456.jpg")
    assert 0 <= h < 2**63 and h != sample_id_to_int("GCC_train_000123457.jpg")
    assert 0 <= sample_id_to_int("9" * 30) < 2**63  # too big for int64: hashed
    for bad in (True, -1, 2**63, "", None, 1.5):
        with pytest.raises(ValueError):
            sample_id_to_int(bad)


def test_fingerprint_encoder() -> None:
    torch = pytest.importorskip("torch")

    class Tiny(torch.nn.Module):
        def __init__(self, config: dict) -> None:
            super().__init__()
            self.config = config
            self.proj = torch.nn.Linear(4, 3)

    torch.manual_seed(0)
    a = Tiny({"hidden": 4, "transformers_version": "4.50", "_name_or_path": "/a"})
    torch.manual_seed(0)
    b = Tiny({"hidden": 4, "transformers_version": "9.99", "_name_or_path": "/b"})
    fa, fb = fingerprint_encoder(a, "tiny"), fingerprint_encoder(b, "other")
    assert fa.matches(fb) and fa != fb  # volatile config keys and model id do not count
    assert fa.model_id == "tiny" and len(fa.config_sha256) == 64
    with torch.no_grad():
        b.proj.weight[0, 0] += 1
    assert not fa.matches(fingerprint_encoder(b))
    c = Tiny({"hidden": 5})
    c.load_state_dict(a.state_dict())
    assert fingerprint_encoder(c).weights_sha256 == fa.weights_sha256
    assert fingerprint_encoder(c).config_sha256 != fa.config_sha256
    assert EncoderFingerprint.from_dict(fa.to_dict()) == fa
    with pytest.raises(ValueError, match="no .config"):
        fingerprint_encoder(torch.nn.Linear(2, 2))
