"""bankd_client.wire: the same bytes as protobuf, read back as views without copies."""

from __future__ import annotations

import numpy as np
import pytest

from bankd.serve import wire as server_wire
from bankd_client import wire
from bankd_client.proto import bankd_pb2 as pb
from bankd_client.types import Hits


def _hits(b: int, k: int, seed: int = 0, with_values: bool = True, rid: str = "") -> Hits:
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, 1 << 40, (b, k)).astype(np.int64)
    scores = rng.standard_normal((b, k)).astype(np.float32)
    values = rng.standard_normal((b, k, 32, 96)).astype(np.float16) if with_values else None
    return Hits(ids, scores, values, rid)


CASES = [
    (4, 5, True, "r-7"),
    (1, 1, False, ""),
    (0, 5, True, "empty"),  # an empty batch: no data bytes at all
    (3, 2, True, "ünïcode id"),
    (130, 3, False, "x" * 200),  # lengths over one varint byte
]


@pytest.mark.parametrize("b,k,with_values,rid", CASES)
def test_search_response_is_byte_for_byte_protobuf(b, k, with_values, rid):
    hits = _hits(b, k, with_values=with_values, rid=rid)
    ours = server_wire.search_response(hits.ids, hits.scores, rid, hits.values)
    assert ours == hits.to_pb().SerializeToString()


@pytest.mark.parametrize("b,k,with_values,rid", CASES)
def test_stream_response_is_byte_for_byte_protobuf(b, k, with_values, rid):
    hits = _hits(b, k, with_values=with_values, rid=rid)
    ours = server_wire.stream_response(rid, hits.ids, hits.scores, hits.values)
    reference = pb.SearchStreamResponse(request_id=rid, result=hits.to_pb())
    assert ours == reference.SerializeToString()


def test_fill_writes_values_in_place():
    hits = _hits(6, 4, seed=3)
    calls = []

    def fill(out: np.ndarray) -> None:
        calls.append(out.shape)
        assert out.flags.writeable and out.flags.c_contiguous
        out[...] = hits.values

    lazy = server_wire.Fill(hits.values.shape, np.float16, fill)
    assert server_wire.search_response(
        hits.ids, hits.scores, "a", lazy
    ) == server_wire.search_response(hits.ids, hits.scores, "a", hits.values)
    assert calls == [hits.values.shape]


@pytest.mark.parametrize("b,k,with_values,rid", CASES)
def test_read_search_response_equals_protobuf_decoding(b, k, with_values, rid):
    hits = _hits(b, k, with_values=with_values, rid=rid)
    data = hits.to_pb().SerializeToString()
    back = wire.read_search_response(data)
    ref = Hits.from_pb(pb.SearchResponse.FromString(data))
    np.testing.assert_array_equal(back.ids, ref.ids)
    np.testing.assert_array_equal(back.scores, ref.scores)
    assert (back.values is None) == (ref.values is None)
    if with_values:
        np.testing.assert_array_equal(back.values, ref.values)
        assert back.values.dtype == np.float16 and back.values.shape == (b, k, 32, 96)
    assert back.request_id == rid


@pytest.mark.parametrize("stream", [False, True])
def test_values_in_region_are_dtype_and_shape_only_byte_for_byte(stream):
    hits = _hits(5, 3, seed=4, rid="s")
    marker = wire.InRegion((5, 3, 32, 96), np.dtype(np.float16))
    reference = pb.SearchResponse(
        ids=hits.to_pb().ids,
        scores=hits.to_pb().scores,
        values=pb.Tensor(dtype=pb.DTYPE_FLOAT16, shape=[5, 3, 32, 96]),
        request_id="s",
        values_in_region=True,
    )
    if stream:
        ours = server_wire.stream_response("s", hits.ids, hits.scores, marker)
        assert ours == pb.SearchStreamResponse(request_id="s", result=reference).SerializeToString()
        back = wire.read_stream_response(ours).hits
    else:
        ours = server_wire.search_response(hits.ids, hits.scores, "s", marker)
        assert ours == reference.SerializeToString()
        back = wire.read_search_response(ours)
    assert back.values == marker
    np.testing.assert_array_equal(back.ids, hits.ids)


def test_values_in_region_with_data_or_a_bad_shape_are_refused():
    bad = pb.SearchResponse(values=pb.Tensor(dtype=pb.DTYPE_FLOAT16, shape=[1], data=b"ab"))
    bad.values_in_region = True
    with pytest.raises(ValueError, match="has data"):
        wire.read_search_response(bad.SerializeToString())
    bad.values.data = b""
    bad.values.shape[:] = [-1]
    with pytest.raises(ValueError, match="invalid shape"):
        wire.read_search_response(bad.SerializeToString())


def test_read_search_response_values_are_a_view_ids_and_scores_are_not():
    hits = _hits(8, 5)
    data = server_wire.search_response(hits.ids, hits.scores, "", hits.values)
    back = wire.read_search_response(data)
    received = np.frombuffer(data, np.uint8)
    assert np.shares_memory(back.values, received) and not back.values.flags.writeable
    for small in (back.ids, back.scores):  # kept ids must not keep the values alive
        assert not np.shares_memory(small, received)
        assert small.base is None or small.base.nbytes == small.nbytes


def test_read_accepts_other_field_orders_unknown_fields_and_unpacked_shapes():
    hits = _hits(2, 3, rid="q")
    msg = hits.to_pb()
    # request_id first, an unknown varint and an unknown length field in between, the
    # shape of ids written unpacked (valid protobuf a parser must accept)
    unknown = bytes([0x48, 0x05]) + bytes([0x3A, 0x02]) + b"zz"  # fields 9 and 7
    ids = msg.ids
    ids_body = bytes([0x08, ids.dtype])
    ids_body += b"".join(bytes([0x10, s]) for s in ids.shape)
    ids_body += bytes([0x1A]) + server_wire.varint(len(ids.data)) + ids.data
    data = (
        pb.SearchResponse(request_id="q").SerializeToString()
        + unknown
        + bytes([0x0A])
        + server_wire.varint(len(ids_body))
        + ids_body
        + pb.SearchResponse(scores=msg.scores, values=msg.values).SerializeToString()
    )
    back = wire.read_search_response(data)
    np.testing.assert_array_equal(back.ids, hits.ids)
    np.testing.assert_array_equal(back.values, hits.values)
    assert back.request_id == "q"


def test_read_stream_response_result_and_error():
    hits = _hits(3, 2, rid="9")
    data = pb.SearchStreamResponse(request_id="9", result=hits.to_pb()).SerializeToString()
    answer = wire.read_stream_response(data)
    assert answer.request_id == "9" and answer.error_code == 0
    np.testing.assert_array_equal(answer.hits.values, hits.values)

    err = pb.SearchStreamResponse(request_id="4", error=pb.Error(code=3, message="bad k"))
    answer = wire.read_stream_response(err.SerializeToString())
    assert (answer.request_id, answer.hits, answer.error_code, answer.error_message) == (
        "4",
        None,
        3,
        "bad k",
    )


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d: d[:-7], "truncated|bytes but shape"),
        (lambda d: d[:3], "truncated"),
        (lambda d: b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", "varint"),
        (lambda d: b"\x00\x01", "field number 0"),
        (lambda d: b"\x0b", "wire type 3"),
    ],
)
def test_read_refuses_malformed_bytes_with_a_clear_error(mutate, match):
    hits = _hits(2, 2)
    data = hits.to_pb().SerializeToString()
    with pytest.raises(ValueError, match=match):
        wire.read_search_response(mutate(data))


def test_read_refuses_wrong_byte_counts_and_missing_tensors():
    hits = _hits(2, 2)
    msg = hits.to_pb()
    msg.values.shape[0] = 3  # shape says more than the bytes hold
    with pytest.raises(ValueError, match="values has .* bytes but shape"):
        wire.read_search_response(msg.SerializeToString())
    with pytest.raises(ValueError, match="ids has unsupported dtype 0"):
        wire.read_search_response(pb.SearchResponse(request_id="x").SerializeToString())
    with pytest.raises(ValueError, match="neither a result nor an error"):
        wire.read_stream_response(pb.SearchStreamResponse(request_id="1").SerializeToString())


def test_the_answer_is_an_ordinary_bytes_object():
    """Written by joining its parts: a bytes object like any other, values and all."""
    hits = _hits(5, 3, seed=11, rid="z")
    fill = server_wire.Fill(
        hits.values.shape, np.float16, lambda out: out.__setitem__(..., hits.values)
    )
    data = server_wire.search_response(hits.ids, hits.scores, "z", fill)
    assert type(data) is bytes
    assert data == hits.to_pb().SerializeToString()
    assert hash(data) == hash(bytes(bytearray(data)))
