"""Property-based bad input against one real server: random and malformed requests.

Hypothesis builds requests the typed client would refuse to send (odd shapes, unknown
dtypes, byte counts not matching the shape, k and exclusion lists out of range, huge
and empty batches), raw protobuf bytes that are not valid messages (invalid UTF-8 in
string fields, truncated or bit-flipped encodings, random bytes) and streams mixing
both. They travel over a raw channel with identity serializers, so the server sees
exactly these bytes. Every call must end with a deliberate status (OK or a client-error
code, never UNKNOWN or INTERNAL) before its deadline, an OK search must be well formed,
and afterwards the server still answers a valid search correctly.

The bank records the tiny encoder, so the server embeds: fuzzed Embed requests carry
valid, mangled, truncated, empty and oversized (by header) images and reach image
decoding; ``test_embed_cases_reach_decoding`` checks that most of them do (run with
``-s`` to see the fraction).
"""

from __future__ import annotations

import dataclasses
import io
import math
import struct
import zlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from bankd.serve.flags import ServerConfig, ServiceLimits
from bankd.serve.server import BankServer
from bankd_client import BankClient, errors, tensors
from bankd_client.proto import bankd_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["MemoryBank"].full_name  # bankd.v1.MemoryBank
KEY_DIM = 128  # encoder_bank's (tests/conftest.py): the tiny encoder's width
MESSAGE_LIMIT = 4 << 20  # small, so oversize requests and responses are cheap to provoke
EMBED_PIXELS = 16_384  # a small Embed pixel budget: four 64 x 64 images
DEADLINE_S = 20.0  # far above any honest answer here: running into it means a hang
# Deliberate answers to a bad request; UNKNOWN and INTERNAL mean an unhandled exception.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
ALLOWED_INTS = {c.value[0] for c in ALLOWED}
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,  # nothing written into the checkout; failures print a reproduce blob
    print_blob=True,
)
INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2, pb.DTYPE_INT64: 8}


# -- the server and raw calls ---------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(encoder_bank: Any) -> Iterator[BankServer]:
    limits = dataclasses.replace(
        ServiceLimits(), max_message_bytes=MESSAGE_LIMIT, max_embed_pixels=EMBED_PIXELS
    )
    config = ServerConfig(
        index=str(encoder_bank.path), port=0, metrics_port=None, device="cpu", limits=limits
    )
    srv = BankServer(config)
    try:
        yield srv.start()
    finally:
        srv.stop(grace=0)


@pytest.fixture(scope="module")
def channel(fuzz_server: BankServer) -> Iterator[grpc.Channel]:
    """A plain channel that may send (and receive) more than the server's limit."""
    options = [
        ("grpc.max_send_message_length", 4 * MESSAGE_LIMIT),
        ("grpc.max_receive_message_length", 4 * MESSAGE_LIMIT),
        ("grpc.enable_retries", 0),
    ]
    ch = grpc.insecure_channel(f"127.0.0.1:{fuzz_server.port}", options=options)
    try:
        yield ch
    finally:
        ch.close()


def unary(channel: grpc.Channel, method: str, body: bytes) -> tuple[grpc.StatusCode, Any]:
    """Send body as the whole request message; (status, response bytes or details)."""
    call = channel.unary_unary(f"/{SERVICE}/{method}")  # no serializers: bytes as they are
    try:
        return grpc.StatusCode.OK, call(body, timeout=DEADLINE_S)
    except grpc.RpcError as e:
        return e.code(), e.details()


def stream(channel: grpc.Channel, bodies: list[bytes]) -> tuple[grpc.StatusCode, Any, list]:
    """Send bodies on one SearchStream; (final status, details, responses received)."""
    call = channel.stream_stream(f"/{SERVICE}/SearchStream")
    responses: list[bytes] = []
    try:
        for r in call(iter(bodies), timeout=DEADLINE_S):
            responses.append(r)
        return grpc.StatusCode.OK, None, responses
    except grpc.RpcError as e:
        return e.code(), e.details(), responses


def assert_deliberate(code: grpc.StatusCode, details: Any, what: str) -> None:
    event(f"{what.split()[0]}: {code.name}")  # --hypothesis-show-statistics
    assert code in ALLOWED, f"{what}: {code.name} {details!r}"
    if code != grpc.StatusCode.OK:
        assert details, f"{what}: {code.name} without a message"


# -- requests -------------------------------------------------------------------------


def mostly(valid: st.SearchStrategy, bad: st.SearchStrategy, odds: int = 4) -> Any:
    """Draws from valid, or about once in ``odds`` from bad: most requests then have
    only one or two things wrong, and some have none (and are answered OK)."""
    return st.integers(1, odds).flatmap(lambda i: bad if i == odds else valid)


@st.composite
def key_tensors(draw: st.DrawFn) -> tuple[pb.Tensor, int]:
    """A keys Tensor, valid or broken in one or more ways; returns (tensor, rows)."""
    b = draw(mostly(st.integers(1, 12), st.sampled_from([0, 8192, 8193, 40_000])))
    d = draw(mostly(st.just(KEY_DIM), st.integers(0, 40)))
    dtype = draw(
        mostly(
            st.sampled_from([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16]),
            st.one_of(st.sampled_from([pb.DTYPE_UNSPECIFIED, pb.DTYPE_INT64]), INT32),
        )
    )
    odd_dim = st.one_of(st.integers(0, 40), st.sampled_from([-1, 2**31, 2**40]), INT64)
    shape = draw(mostly(st.just([b, d]), st.lists(odd_dim, max_size=10)))
    count = math.prod(max(s, 0) for s in shape)
    nbytes = count * ITEMSIZE.get(dtype, 4)
    how = draw(
        mostly(
            st.just("normal"),
            st.sampled_from(["nonfinite", "bit patterns", "off", "random", "oversize"]),
        )
    )
    if how in ("normal", "nonfinite", "bit patterns") and nbytes <= 2 * MESSAGE_LIMIT:
        data = _key_bytes(nbytes, draw(st.integers(0, 2**32 - 1)), how)
    elif how == "off" and nbytes <= MESSAGE_LIMIT:
        delta = draw(st.sampled_from([-9, -2, -1, 1, 3, 64]))
        data = b"\x3c" * max(nbytes + delta, 0)
    elif how == "oversize":
        data = b"\x00" * (MESSAGE_LIMIT + 1024)
    else:
        data = draw(st.binary(max_size=300))
    return pb.Tensor(dtype=dtype, shape=shape, data=data), b


def _key_bytes(nbytes: int, seed: int, kind: str) -> bytes:
    rng = np.random.default_rng(seed)
    if kind == "bit patterns":  # NaNs, infs, subnormals, anything
        return rng.integers(0, 256, size=nbytes, dtype=np.uint8).tobytes()
    a = rng.standard_normal(nbytes // 4 + 1).astype(np.float32)
    if kind == "nonfinite":
        a[rng.integers(0, len(a))] = rng.choice([np.nan, np.inf, -np.inf])
    return a.tobytes()[:nbytes]


@st.composite
def exclusions(
    draw: st.DrawFn, rows: int, entry_ids: st.SearchStrategy[int]
) -> list[pb.ExcludeIds]:
    """One list per query row of the bank's ids, or lists wrong in count or content."""
    if rows <= 64 and draw(st.integers(0, 2)):
        return [pb.ExcludeIds(ids=draw(st.lists(entry_ids, max_size=3))) for _ in range(rows)]
    ids = st.one_of(entry_ids, INT64, st.integers(-5, 5))
    out = []
    for _ in range(draw(st.integers(0, 14))):
        if draw(st.integers(0, 20)) == 0:  # over the per-query limit
            out.append(pb.ExcludeIds(ids=[1000] * 1025))
        else:
            out.append(pb.ExcludeIds(ids=draw(st.lists(ids, max_size=6))))
    return out


@st.composite
def search_requests(draw: st.DrawFn, entry_ids: st.SearchStrategy[int]) -> pb.SearchRequest:
    keys, rows = draw(key_tensors())
    odd_k = st.one_of(st.sampled_from([0, -1, 1024, 1025, 2**31 - 1, -(2**31)]), INT32)
    return pb.SearchRequest(
        keys=keys,
        k=draw(mostly(st.integers(1, 8), odd_k)),
        exclude=draw(st.one_of(st.just([]), exclusions(rows, entry_ids))),
        with_values=draw(st.booleans()),
        request_id=draw(st.text(max_size=12)),
    )


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def string_field(number: int, raw: bytes) -> bytes:
    """A length-delimited field carrying raw bytes (which need not be UTF-8)."""
    return _varint(number << 3 | 2) + _varint(len(raw)) + raw


INVALID_UTF8 = st.sampled_from(
    [b"\xff", b"\xc3\x28", b"\xe2\x28\xa1", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"a\x80b"]
)


@st.composite
def mangled(draw: st.DrawFn, valid: bytes) -> bytes:
    """A valid encoding truncated, bit-flipped, or with garbage spliced in."""
    how = draw(st.sampled_from(["truncate", "flip", "splice"]))
    data = bytearray(valid)
    if not data:
        return draw(st.binary(min_size=1, max_size=64))
    at = draw(st.integers(0, len(data) - 1))
    if how == "truncate":
        return bytes(data[:at])
    if how == "flip":
        data[at] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    return bytes(data[:at]) + draw(st.binary(min_size=1, max_size=16)) + bytes(data[at:])


def _png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def _declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header (valid CRC) declares width x height pixels."""
    data = _png(4, 4, 0)
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


VALID_PNG = st.builds(_png, st.integers(1, 48), st.integers(1, 48), st.integers(0, 2**16))


@st.composite
def images(draw: st.DrawFn) -> bytes:
    """An encoded image: valid, mangled, oversized by its header, empty, or random."""
    how = draw(st.sampled_from(["valid", "valid", "mangled", "oversized", "empty", "random"]))
    if how == "valid":
        return draw(VALID_PNG)
    if how == "mangled":
        return draw(mangled(draw(VALID_PNG)))
    if how == "oversized":
        return _declaring(draw(st.integers(129, 70_000)), draw(st.integers(129, 70_000)))
    return b"" if how == "empty" else draw(st.binary(max_size=64))


@st.composite
def embed_requests(draw: st.DrawFn) -> pb.EmbedRequest:
    """Mostly 1-4 images with no texts or one per image; sometimes the counts are off."""
    blobs = draw(mostly(st.lists(images(), min_size=1, max_size=4), st.lists(images())))
    texts = draw(
        mostly(
            st.one_of(st.just([]), st.lists(st.text(max_size=8), min_size=len(blobs),
                                             max_size=len(blobs))),
            st.lists(st.text(max_size=8), max_size=6),
        )
    )  # fmt: skip
    return pb.EmbedRequest(images=blobs, texts=texts)


# Embed answers and whether each reached image decoding (OK, or an error about an image).
EMBED_OUTCOMES: Counter[str] = Counter()


def record_embed(code: grpc.StatusCode, got: Any) -> None:
    decoding = code == grpc.StatusCode.OK or (
        code == grpc.StatusCode.INVALID_ARGUMENT and str(got).startswith(("image ", "images "))
    )
    EMBED_OUTCOMES["decoding" if decoding else "stopped before"] += 1
    event(f"Embed: {'reached' if decoding else 'stopped before'} image decoding")


# -- properties -----------------------------------------------------------------------

# The shared bank's entry ids are a permutation of 1000 + 7 * i (tests/conftest.py).
ENTRY_IDS = st.integers(0, 2999).map(lambda i: 1000 + 7 * i)
VALID_BODIES = {
    "Search": search_requests(ENTRY_IDS).map(lambda r: r.SerializeToString()),
    "Fetch": st.lists(st.one_of(ENTRY_IDS, INT64), max_size=5).map(
        lambda ids: pb.FetchRequest(ids=ids).SerializeToString()
    ),
    "GetInfo": st.just(b""),
    "Embed": embed_requests().map(lambda r: r.SerializeToString()),
}
STRING_FIELD = {"Search": 5, "Embed": 2}  # SearchRequest.request_id, EmbedRequest.texts


def test_entry_ids_are_as_assumed(encoder_bank: Any) -> None:
    assert sorted(encoder_bank.ids.tolist()) == [1000 + 7 * i for i in range(3000)]
    assert encoder_bank.keys.shape[1] == KEY_DIM


def check_search_response(body: bytes, request: pb.SearchRequest) -> None:
    """An OK answer to a request the server accepted is a well-formed top-k."""
    response = pb.SearchResponse.FromString(body)
    ids = tensors.decode(response.ids, name="ids")
    scores = tensors.decode(response.scores, name="scores")
    rows = len(tensors.decode(request.keys, name="keys"))
    assert ids.shape == scores.shape == (rows, request.k)
    assert response.request_id == request.request_id
    assert response.HasField("values") == request.with_values
    for row, excluded in zip(ids, request.exclude or [None] * rows, strict=True):
        assert not set(row.tolist()) & set(excluded.ids if excluded else []), "excluded id"


@FUZZ
@given(request=search_requests(ENTRY_IDS))
def test_fuzz_search(channel: grpc.Channel, request: pb.SearchRequest) -> None:
    code, got = unary(channel, "Search", request.SerializeToString())
    assert_deliberate(code, got, "Search")
    if code == grpc.StatusCode.OK:
        check_search_response(got, request)


@FUZZ
@given(method=st.sampled_from(sorted(VALID_BODIES)), data=st.data())
def test_fuzz_raw_bytes(channel: grpc.Channel, method: str, data: st.DataObject) -> None:
    """Bytes that are not a valid message of the method's type, or barely are."""
    base = data.draw(VALID_BODIES[method])
    how = data.draw(st.sampled_from(["random", "mangled", "utf8"]))
    if how == "random":
        body = data.draw(st.binary(max_size=2048))
    elif how == "mangled":
        body = data.draw(mangled(base))
    else:  # GetInfo and Fetch have no string field: an unknown field 7 is just bytes
        body = base + string_field(STRING_FIELD.get(method, 7), data.draw(INVALID_UTF8))
    code, got = unary(channel, method, body)
    assert_deliberate(code, got, f"{method} {how}")


@FUZZ
@given(
    ids=st.one_of(
        st.lists(st.one_of(ENTRY_IDS, INT64), max_size=20),
        st.just([1000] * 65_537),  # over the fetch limit
    ),
    with_keys=st.booleans(),
    embed=embed_requests(),
)
def test_fuzz_fetch_and_embed(
    channel: grpc.Channel, ids: list[int], with_keys: bool, embed: pb.EmbedRequest
) -> None:
    request = pb.FetchRequest(ids=ids, with_keys=with_keys)
    code, got = unary(channel, "Fetch", request.SerializeToString())
    assert_deliberate(code, got, "Fetch")
    if code == grpc.StatusCode.OK:
        response = pb.FetchResponse.FromString(got)
        values = tensors.decode(response.values, name="values")
        assert len(values) == len(ids) and response.HasField("keys") == with_keys
    code, got = unary(channel, "Embed", embed.SerializeToString())
    assert_deliberate(code, got, "Embed")
    record_embed(code, got)
    if code == grpc.StatusCode.OK:
        keys = tensors.decode(pb.EmbedResponse.FromString(got).keys, name="keys")
        assert keys.shape == (len(embed.images), KEY_DIM) and np.isfinite(keys).all()


def test_embed_cases_reach_decoding() -> None:
    """Runs after the fuzzing above: most fuzzed Embed requests got to the images (the
    server has an encoder), rather than stopping at FAILED_PRECONDITION or counts."""
    total = sum(EMBED_OUTCOMES.values())
    if not total:
        pytest.skip("test_fuzz_fetch_and_embed did not run in this session")
    fraction = EMBED_OUTCOMES["decoding"] / total
    print(f"fuzzed Embed requests that reached image decoding: {fraction:.0%} of {total}")
    assert fraction >= 0.6, EMBED_OUTCOMES


STREAM_BODY = st.one_of(
    VALID_BODIES["Search"],
    st.binary(max_size=256),
    INVALID_UTF8.map(lambda bad: string_field(5, bad)),
)


@settings(FUZZ, max_examples=60)
@given(bodies=st.lists(STREAM_BODY, max_size=6))
def test_fuzz_search_stream(channel: grpc.Channel, bodies: list[bytes]) -> None:
    """A stream of good, bad and undecodable requests: each answer is a result or a
    deliberate error, and the stream itself ends deliberately."""
    code, details, responses = stream(channel, bodies)
    assert_deliberate(code, details, "SearchStream")
    assert len(responses) <= len(bodies)
    for raw_response in responses:
        r = pb.SearchStreamResponse.FromString(raw_response)
        if r.WhichOneof("outcome") == "error":
            event(f"SearchStream message: {errors.code_from_int(r.error.code).name}")
            assert r.error.code in ALLOWED_INTS, f"stream message: {r.error}"
    if code == grpc.StatusCode.OK:
        assert len(responses) == len(bodies)


def test_undecodable_request_is_invalid_argument(channel: grpc.Channel, encoder_bank: Any) -> None:
    """The examples behind the fix: gRPC's own answer to these is INTERNAL."""
    for method in ("Search", "Fetch", "Embed", "GetInfo"):
        code, details = unary(channel, method, b"\xff\xff\xff")
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (method, code, details)
        assert "not a valid protobuf message" in details
    queries = encoder_bank.queries(2, seed=0)
    good = pb.SearchRequest(keys=tensors.encode(queries), k=3, request_id="0")
    body = good.SerializeToString()
    code, details = unary(channel, "Search", body + string_field(5, b"\xc3\x28"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in details
    # A stream answers the requests before the undecodable one, then ends.
    code, details, responses = stream(channel, [body, b"\xff", body])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid protobuf" in details
    assert [pb.SearchStreamResponse.FromString(r).request_id for r in responses] == ["0"]


def test_server_still_serves_after_fuzzing(
    fuzz_server: BankServer, encoder_bank: Any, helpers: Any
) -> None:
    bank = encoder_bank
    """Runs last in this module: after everything above, a valid search is right."""
    with BankClient(f"127.0.0.1:{fuzz_server.port}", timeout=30) as client:
        q = bank.queries(5, seed=2024)
        exclude = [[int(bank.ids[0])]] * 5
        hits = client.search(q, k=7, exclude_ids=exclude)
        helpers.assert_topk(bank, q, 7, hits.ids, hits.scores, exclude)
        np.testing.assert_array_equal(hits.values, helpers.values_of(bank, hits.ids))
