"""One exception family for the whole project, mapped to and from gRPC status codes.

The server raises these (or ValueError for bad arguments) and the servicer turns them
into status codes; the client turns status codes back into the same classes, so
callers catch ``BankError`` subclasses and never see ``grpc.RpcError``.
"""

from __future__ import annotations

import grpc


class BankError(Exception):
    """Base of every error bankd and bankd_client raise on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidArgument(BankError, ValueError):
    """The request is malformed: shape, dtype, k, batch size, byte count, NaN keys."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(BankError, KeyError):
    """An entry id the bank does not hold."""

    code = grpc.StatusCode.NOT_FOUND

    def __str__(self) -> str:  # KeyError would quote the message
        return self.message


class FailedPrecondition(BankError):
    """The request cannot run in the bank's state (e.g. no encoder to embed with)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class EncoderMismatch(FailedPrecondition):
    """The client's vision encoder is not the one the bank's keys were computed with."""


class ResourceExhausted(BankError):
    """Too many concurrent requests, or a message over the size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(BankError):
    """The server is not reachable, not loaded yet, or draining."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(BankError):
    """The call's deadline passed before it was answered."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(BankError):
    """Missing or wrong credentials."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(BankError):
    """Credentials are valid but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Cancelled(BankError):
    """The call was cancelled."""

    code = grpc.StatusCode.CANCELLED


class Internal(BankError):
    """A server-side bug; the message carries what the server logged."""

    code = grpc.StatusCode.INTERNAL


class BankFileError(BankError):
    """A bank on disk is missing, corrupt or inconsistent; the message names the file."""

    code = grpc.StatusCode.FAILED_PRECONDITION


_BY_CODE: dict[grpc.StatusCode, type[BankError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        Unauthenticated,
        PermissionDenied,
        Cancelled,
        Internal,
    )
}


def error_for_code(code: grpc.StatusCode, message: str) -> BankError:
    """The typed exception for a status code (BankError for codes without a class)."""
    cls = _BY_CODE.get(code)
    if cls is None:
        err = BankError(message)
        err.code = code
        return err
    if cls is FailedPrecondition and "encoder mismatch" in message.lower():
        return EncoderMismatch(message)
    return cls(message)


def from_rpc_error(error: grpc.RpcError) -> BankError:
    """Translate a ``grpc.RpcError`` raised by a stub call."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return error_for_code(code, details or code.name)


def code_from_int(value: int) -> grpc.StatusCode:
    """StatusCode from its integer value (as carried in a stream's Error message)."""
    for code in grpc.StatusCode:
        if code.value[0] == value:
            return code
    return grpc.StatusCode.UNKNOWN
