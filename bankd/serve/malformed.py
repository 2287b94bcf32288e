"""Requests whose bytes are not a valid message: INVALID_ARGUMENT, not INTERNAL.

gRPC's Python server answers a request it cannot deserialize with INTERNAL
("Exception deserializing request!"), the code of a server bug, and logs a traceback.
Random bytes, a truncated message or invalid UTF-8 in a string field are the caller's
mistake, so this interceptor gives MemoryBank's handlers a deserializer that cannot
fail: an undecodable request is answered INVALID_ARGUMENT with the parser's complaint.
On SearchStream the requests before an undecodable one are answered, then the stream
ends INVALID_ARGUMENT (its request id cannot be read, so it cannot be answered alone).

    grpc.server(..., interceptors=[UndecodableRequests(SERVICE_NAME, metrics)])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from bankd.serve.metrics import Metrics


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer returns for bytes that do not parse."""

    error: str

    @property
    def message(self) -> str:
        return f"the request is not a valid protobuf message: {self.error}"


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as e:  # protobuf's DecodeError, whatever its implementation
            return Undecodable(str(e))

    return deserialize


class UndecodableRequests(grpc.ServerInterceptor):
    """Answers undecodable requests to one service's unary and stream-stream methods
    with INVALID_ARGUMENT (counted in ``bankd_requests_total``)."""

    def __init__(self, service: str, metrics: Metrics | None = None) -> None:
        self._prefix = f"/{service}/"
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if (
            handler is None
            or handler.request_deserializer is None
            or not details.method.startswith(self._prefix)
        ):
            return handler
        method = details.method[len(self._prefix) :]
        parse = _tolerant(handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._stream(handler.stream_stream, method),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        return handler

    def _refuse(self, context: grpc.ServicerContext, method: str, bad: Undecodable) -> None:
        if self._metrics is not None:
            self._metrics.requests.labels(method=method, code="INVALID_ARGUMENT").inc()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)

    def _unary(self, behavior: Callable, method: str) -> Callable:
        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            if isinstance(request, Undecodable):
                self._refuse(context, method, request)
            return behavior(request, context)

        return handle

    def _stream(self, behavior: Callable, method: str) -> Callable:
        def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            bad: list[Undecodable] = []

            def decoded() -> Iterator[Any]:
                for request in requests:
                    if isinstance(request, Undecodable):
                        bad.append(request)  # read before the handler's last answer
                        return
                    yield request

            yield from behavior(decoded(), context)
            if bad:
                self._refuse(context, method, bad[0])

        return handle
