"""The error family (a class per status code, both ways), and BankClient against a
scripted fake MemoryBank: a real gRPC server on port 0 whose answers the test controls
(out-of-order streams, failures, retries, metadata).

The parts the client is made of are tested in test_types.py; the real server is
exercised through the same client in tests/bankd/test_server_*.py.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
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
    NotFound,
    ResourceExhausted,
    SearchQuery,
    Unavailable,
    errors,
    tensors,
)
from bankd_client.proto import bankd_pb2 as pb
from bankd_client.proto import bankd_pb2_grpc as pb_grpc

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

    def __init__(self, info: BankInfo) -> None:
        self.calls: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.search_failures: list[grpc.StatusCode] = []
        self.stream_errors: dict[str, tuple[int, str]] = {}
        self.stream_drop: set[str] = set()
        self.info = info
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
def fake(make_info: Callable[..., BankInfo]) -> Iterator[tuple[FakeBank, int, Any]]:
    servicer = FakeBank(make_info(key_dim=4, value_shape=(2, 3)))
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


def test_check_encoder(
    fake: Any, fake_client: BankClient, make_info: Callable[..., BankInfo], encoder_fp: Any
) -> None:
    fp = encoder_fp
    assert fake_client.check_encoder(fp) == fp
    renamed = EncoderFingerprint("elsewhere/tiny", fp.config_sha256, fp.weights_sha256)
    assert fake_client.check_encoder(renamed) == renamed  # the model id is informational
    other = EncoderFingerprint("tiny", fp.config_sha256, "x" * 64)
    with pytest.raises(EncoderMismatch, match="encoder mismatch"):
        fake_client.check_encoder(other)
    assert fake_client.check_encoder(other, allow_mismatch=True) == other
    fake[0].info = make_info(vision_encoder=None)
    fake_client.info(refresh=True)
    with pytest.raises(EncoderMismatch, match="no vision encoder"):
        fake_client.check_encoder(fp)
