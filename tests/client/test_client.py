"""Tests of bankd_client on its own: wire tensors, errors, domain types, identities, and
BankClient against a scripted fake MemoryBank (a real gRPC server on port 0 whose
answers the test controls: out-of-order streams, failures, retries, metadata).

The real server is exercised through the same client in tests/bankd/test_server.py.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from bankd_client import (
    BankClient,
    BankError,
    BankInfo,
    EncoderFingerprint,
    EncoderMismatch,
    FailedPrecondition,
    Hits,
    Internal,
    InvalidArgument,
    KeyFunctionSpec,
    NotFound,
    ResourceExhausted,
    SearchQuery,
    Unavailable,
    errors,
    fingerprint_encoder,
    sample_id_to_int,
    tensors,
)
from bankd_client.proto import bankd_pb2 as pb
from bankd_client.proto import bankd_pb2_grpc as pb_grpc
from bankd_client.types import exclude_to_pb

FP = EncoderFingerprint("tiny", "c" * 64, "w" * 64)


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


# -- errors ----------------------------------------------------------------------------


TYPED = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.CANCELLED: errors.Cancelled,
    grpc.StatusCode.INTERNAL: errors.Internal,
}


@pytest.mark.parametrize("code", list(TYPED), ids=lambda c: c.name)
def test_each_status_code_has_its_class(code: grpc.StatusCode) -> None:
    err = errors.error_for_code(code, "what went wrong")
    assert type(err) is TYPED[code] and err.code == code
    assert isinstance(err, BankError) and str(err) == "what went wrong"
    assert errors.code_from_int(code.value[0]) == code


def test_error_family_details() -> None:
    other = errors.error_for_code(grpc.StatusCode.ABORTED, "aborted")
    assert type(other) is BankError and other.code == grpc.StatusCode.ABORTED
    mismatch = errors.error_for_code(grpc.StatusCode.FAILED_PRECONDITION, "Encoder mismatch: x")
    assert type(mismatch) is EncoderMismatch and isinstance(mismatch, FailedPrecondition)
    assert str(NotFound("unknown entry ids: [3]")) == "unknown entry ids: [3]"  # not quoted
    assert issubclass(InvalidArgument, ValueError) and issubclass(NotFound, KeyError)
    assert issubclass(errors.BankFileError, BankError)
    assert errors.code_from_int(12345) == grpc.StatusCode.UNKNOWN


# -- domain types ----------------------------------------------------------------------


def _info(**overrides: Any) -> BankInfo:
    fields: dict[str, Any] = dict(
        entries=3000,
        key_dim=32,
        value_shape=(32, 96),
        value_dtype="float16",
        index_type="HNSW32",
        metric="ip",
        vision_encoder=FP,
        text_encoder=EncoderFingerprint("text", "t" * 64, "u" * 64),
        key_function=KeyFunctionSpec("attnpool-v1", {"dim": 32, "name": "attnpool-v1"}, b"wts"),
        max_k=1024,
        max_batch=8192,
        bank_id="b" * 64,
        server_version="0.1.0",
        embed_available=True,
        search_device="cuda:0",
        max_message_bytes=1 << 28,
    )
    fields.update(overrides)
    return BankInfo(**fields)


def test_bank_info_round_trip() -> None:
    info = _info()
    msg = pb.GetInfoResponse.FromString(info.to_pb().SerializeToString())
    assert BankInfo.from_pb(msg) == info
    bare = _info(vision_encoder=None, text_encoder=None, key_function=None)
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


# -- BankClient against a scripted fake server -----------------------------------------


def _fake_hits(request: pb.SearchRequest) -> pb.SearchResponse:
    """ids[b, j] = 1000 * round(keys[b, 0]) + j: each answer says which query it is."""
    keys = tensors.decode(request.keys)
    b, k = keys.shape[0], request.k
    ids = (1000 * np.round(keys[:, :1].astype(np.float64))).astype(np.int64) + np.arange(k)
    scores = np.tile(np.linspace(1, 0, k, dtype=np.float32), (b, 1))
    values = np.zeros((b, k, 2, 3), np.float16) if request.with_values else None
    return Hits(ids, scores, values, request.request_id).to_pb()


class FakeBank(pb_grpc.MemoryBankServicer):
    """A MemoryBank whose behaviour each test scripts."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.search_failures: list[grpc.StatusCode] = []
        self.stream_errors: dict[str, tuple[int, str]] = {}
        self.stream_drop: set[str] = set()
        self.info = _info(key_dim=4, value_shape=(2, 3))
        self.last_request: Any = None
        self.search_delay = 0.0
        self.lock = threading.Lock()

    def _count(self, method: str, context: grpc.ServicerContext) -> None:
        with self.lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self.metadata.append(dict(context.invocation_metadata()))

    def GetInfo(self, request: Any, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        self._count("GetInfo", context)
        return self.info.to_pb()

    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> Any:
        self._count("Search", context)
        self.last_request = request
        time.sleep(self.search_delay)
        if self.search_failures:
            code = self.search_failures.pop(0)
            context.abort(code, f"scripted {code.name}")
        return _fake_hits(request)

    def SearchStream(
        self, request_iterator: Iterator[pb.SearchRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SearchStreamResponse]:
        self._count("SearchStream", context)
        requests = list(request_iterator)
        for r in reversed(requests):  # answer out of order, as a busy server may
            if r.request_id in self.stream_drop:
                continue
            if r.request_id in self.stream_errors:
                code, message = self.stream_errors[r.request_id]
                yield pb.SearchStreamResponse(
                    request_id=r.request_id, error=pb.Error(code=code, message=message)
                )
            else:
                yield pb.SearchStreamResponse(request_id=r.request_id, result=_fake_hits(r))

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Any:
        self._count("Fetch", context)
        ids = np.array(request.ids, np.int64)
        values = np.broadcast_to(ids[:, None, None], (len(ids), 2, 3)).astype(np.float16)
        msg = pb.FetchResponse(values=tensors.encode(values))
        if request.with_keys:
            msg.keys.CopyFrom(tensors.encode(np.tile(ids[:, None], (1, 4)).astype(np.float32)))
        return msg

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> Any:
        self._count("Embed", context)
        self.last_request = request
        return pb.EmbedResponse(keys=tensors.encode(np.ones((len(request.images), 4), np.float32)))


@pytest.fixture
def fake() -> Iterator[tuple[FakeBank, int, health.HealthServicer]]:
    servicer = FakeBank()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_MemoryBankServicer_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port, health_servicer
    server.stop(0).wait()


@pytest.fixture
def fake_client(fake: Any) -> Iterator[BankClient]:
    with BankClient(f"127.0.0.1:{fake[1]}", timeout=10) as c:
        yield c


def _keys(*tags: int) -> np.ndarray:
    """Query keys whose first element tags the query (the fake echoes it in the ids)."""
    k = np.zeros((len(tags), 4), np.float32)
    k[:, 0] = tags
    return k


def test_search_sends_the_request_and_decodes_hits(fake: Any, fake_client: BankClient) -> None:
    servicer = fake[0]
    hits = fake_client.search(_keys(3, 4), k=2, exclude_ids=[[7], [8, 9]])
    np.testing.assert_array_equal(hits.ids, [[3000, 3001], [4000, 4001]])
    assert hits.values.shape == (2, 2, 2, 3) and hits.values.dtype == np.float16
    sent = servicer.last_request
    assert sent.k == 2 and sent.with_values
    assert [list(e.ids) for e in sent.exclude] == [[7], [8, 9]]
    np.testing.assert_array_equal(tensors.decode(sent.keys), _keys(3, 4))
    # float64 and list keys go out as float32; float16 stays float16.
    fake_client.search(_keys(1).astype(np.float64).tolist(), k=1, with_values=False)
    assert servicer.last_request.keys.dtype == pb.DTYPE_FLOAT32
    assert not servicer.last_request.with_values
    fake_client.search(_keys(1).astype(np.float16), k=1)
    assert servicer.last_request.keys.dtype == pb.DTYPE_FLOAT16


def test_search_refuses_non_matrix_keys_locally(fake: Any, fake_client: BankClient) -> None:
    with pytest.raises(InvalidArgument, match=r"\[B, d\]"):
        fake_client.search(np.zeros((2, 2, 4), np.float32))
    with pytest.raises(InvalidArgument, match=r"\[B, d\]"):
        fake_client.search(np.zeros(4, np.float32))
    assert "Search" not in fake[0].calls


def test_search_torch_in_torch_out(fake_client: BankClient) -> None:
    torch = pytest.importorskip("torch")
    hits = fake_client.search(torch.from_numpy(_keys(5)), k=3)
    assert isinstance(hits.ids, torch.Tensor) and hits.ids.tolist() == [[5000, 5001, 5002]]
    assert isinstance(hits.values, torch.Tensor)


def test_stream_search_restores_request_order(fake: Any, fake_client: BankClient) -> None:
    queries = [_keys(i, i) for i in range(30)]
    queries[4] = SearchQuery(keys=_keys(4), k=7)
    out = list(fake_client.stream_search(queries, k=2, with_values=False))
    assert [int(h.ids[0, 0]) // 1000 for h in out] == list(range(30))
    assert [h.request_id for h in out] == [str(i) for i in range(30)]
    assert out[4].ids.shape == (1, 7) and out[3].ids.shape == (2, 2)
    assert all(h.values is None for h in out)


def test_stream_search_error_raises_at_its_position(fake: Any, fake_client: BankClient) -> None:
    fake[0].stream_errors["5"] = (grpc.StatusCode.NOT_FOUND.value[0], "no such thing")
    got = []
    with pytest.raises(NotFound, match="no such thing"):
        for hits in fake_client.stream_search([_keys(i) for i in range(10)], k=1):
            got.append(int(hits.ids[0, 0]) // 1000)
    assert got == [0, 1, 2, 3, 4]


def test_stream_search_missing_answer_is_internal(fake: Any, fake_client: BankClient) -> None:
    fake[0].stream_drop.add("2")
    got = []
    with pytest.raises(Internal, match="unanswered"):
        for hits in fake_client.stream_search([_keys(i) for i in range(4)], k=1):
            got.append(hits)
    assert len(got) == 2


@pytest.mark.parametrize("code", list(TYPED), ids=lambda c: c.name)
def test_status_codes_become_typed_errors(fake: Any, code: grpc.StatusCode) -> None:
    fake[0].search_failures = [code] * 5
    with BankClient(f"127.0.0.1:{fake[1]}", timeout=10, retry_attempts=2) as c:
        with pytest.raises(TYPED[code], match=f"scripted {code.name}"):
            c.search(_keys(1), k=1)


def test_unavailable_is_retried(fake: Any) -> None:
    servicer, port, _ = fake
    servicer.search_failures = [grpc.StatusCode.UNAVAILABLE] * 2
    with BankClient(f"127.0.0.1:{port}", timeout=10, retry_attempts=3) as c:
        hits = c.search(_keys(6), k=1)
    assert int(hits.ids[0, 0]) == 6000 and servicer.calls["Search"] == 3


def test_retries_stop_after_retry_attempts(fake: Any) -> None:
    servicer, port, _ = fake
    servicer.search_failures = [grpc.StatusCode.UNAVAILABLE] * 5
    with BankClient(f"127.0.0.1:{port}", timeout=10, retry_attempts=2) as c:
        with pytest.raises(Unavailable):
            c.search(_keys(6), k=1)
    assert servicer.calls["Search"] == 2


def test_other_errors_are_not_retried(fake: Any, fake_client: BankClient) -> None:
    fake[0].search_failures = [grpc.StatusCode.RESOURCE_EXHAUSTED]
    with pytest.raises(ResourceExhausted):
        fake_client.search(_keys(1), k=1)
    assert fake[0].calls["Search"] == 1


def test_retry_attempts_one_means_no_retries(fake: Any) -> None:
    servicer, port, _ = fake
    servicer.search_failures = [grpc.StatusCode.UNAVAILABLE]
    with BankClient(f"127.0.0.1:{port}", timeout=10, retry_attempts=1) as c:
        with pytest.raises(Unavailable):
            c.search(_keys(1), k=1)
        assert int(c.search(_keys(2), k=1).ids[0, 0]) == 2000
    assert servicer.calls["Search"] == 2


@pytest.mark.parametrize("attempts", [0, 6])
def test_retry_attempts_out_of_range(attempts: int) -> None:
    with pytest.raises(ValueError, match="retry_attempts"):
        BankClient("127.0.0.1:1", retry_attempts=attempts)


def test_bearer_token_is_sent(fake: Any) -> None:
    with BankClient(f"127.0.0.1:{fake[1]}", timeout=10, token="s3cret") as c:
        c.info()
        c.search(_keys(1), k=1)
        list(c.stream_search([_keys(1)], k=1))
        c.fetch([1])
    assert len(fake[0].metadata) == 4
    assert all(m.get("authorization") == "Bearer s3cret" for m in fake[0].metadata)


def test_info_is_cached_until_refreshed(fake: Any, fake_client: BankClient) -> None:
    assert fake_client.info() == fake[0].info
    fake_client.info()
    assert fake[0].calls["GetInfo"] == 1
    fake_client.info(refresh=True)
    assert fake[0].calls["GetInfo"] == 2


def test_receive_limit_applies(fake: Any) -> None:
    target = f"127.0.0.1:{fake[1]}"
    with BankClient(target, timeout=10, max_message_bytes=1024, split_batches=False) as c:
        with pytest.raises(ResourceExhausted):
            c.search(_keys(*range(20)), k=20)  # 20*20*12 bytes of values alone
    # Splitting cannot bring one query's hits under 1 KiB: refused before sending.
    with BankClient(target, timeout=10, max_message_bytes=1024) as c:
        with pytest.raises(InvalidArgument, match="1024-byte message limit"):
            c.search(_keys(*range(20)), k=20)


def test_deadline_becomes_deadline_exceeded(fake: Any) -> None:
    servicer, port, _ = fake
    servicer.search_delay = 0.5
    with BankClient(f"127.0.0.1:{port}", timeout=0.1) as c:
        t0 = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            c.search(_keys(1), k=1)
        assert time.monotonic() - t0 < 0.45
        assert int(c.search(_keys(2), k=1, timeout=5).ids[0, 0]) == 2000


def test_fetch(fake_client: BankClient) -> None:
    values = fake_client.fetch(np.array([3, 1, 3]))
    assert values.shape == (3, 2, 3) and values.dtype == np.float16
    assert values[:, 0, 0].tolist() == [3, 1, 3]
    values, keys = fake_client.fetch([5], with_keys=True)
    assert keys.tolist() == [[5, 5, 5, 5]]


def test_fetch_torch(fake_client: BankClient) -> None:
    torch = pytest.importorskip("torch")
    values, keys = fake_client.fetch(torch.tensor([2, 4]), with_keys=True)
    assert isinstance(values, torch.Tensor) and isinstance(keys, torch.Tensor)
    assert values[:, 0, 0].tolist() == [2, 4]


def test_embed_encodes_images(fake: Any, fake_client: BankClient, tmp_path: Path) -> None:
    from PIL import Image

    image = Image.new("RGB", (8, 8), (255, 0, 0))
    path = tmp_path / "red.png"
    image.save(path)
    keys = fake_client.embed([image, path, str(path), path.read_bytes()], texts=["a", "b", "", ""])
    assert keys.shape == (4, 4)
    sent = fake[0].last_request
    assert list(sent.texts) == ["a", "b", "", ""]
    for blob in sent.images:
        assert Image.open(io.BytesIO(blob)).getpixel((0, 0)) == (255, 0, 0)
    with pytest.raises(ValueError, match="cannot send"):
        fake_client.embed([np.zeros((8, 8, 3))])


def test_wait_ready(fake: Any) -> None:
    _, port, health_servicer = fake
    service = "bankd.v1.MemoryBank"
    health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    with BankClient(f"127.0.0.1:{port}") as c:
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="not SERVING"):
            c.wait_ready(timeout=0.3)
        assert time.monotonic() - t0 < 2
        threading.Timer(
            0.2, health_servicer.set, (service, health_pb2.HealthCheckResponse.SERVING)
        ).start()
        c.wait_ready(timeout=5)


def test_wait_ready_unreachable() -> None:
    with BankClient("127.0.0.1:1") as c:
        with pytest.raises(Unavailable):
            c.wait_ready(timeout=0.3)


def test_check_encoder(fake: Any, fake_client: BankClient) -> None:
    assert fake_client.check_encoder(FP) == FP
    renamed = EncoderFingerprint("elsewhere/tiny", FP.config_sha256, FP.weights_sha256)
    assert fake_client.check_encoder(renamed) == renamed  # the model id is informational
    other = EncoderFingerprint("tiny", FP.config_sha256, "x" * 64)
    with pytest.raises(EncoderMismatch, match="encoder mismatch"):
        fake_client.check_encoder(other)
    assert fake_client.check_encoder(other, allow_mismatch=True) == other
    fake[0].info = _info(vision_encoder=None)
    fake_client.info(refresh=True)
    with pytest.raises(EncoderMismatch, match="no vision encoder"):
        fake_client.check_encoder(FP)
