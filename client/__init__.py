"""bankd_client: the Python client of bankd, and the wire types both sides share.

Light on purpose: importing it pulls in grpc, protobuf and numpy, never faiss,
transformers or the server; torch tensors are converted only when torch is present.
"""

from .bank import Bank
from .client import BankClient
from .errors import (
    BankError,
    DeadlineExceeded,
    EncoderMismatch,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from .identity import EncoderFingerprint, fingerprint_encoder, sample_id_to_int, tune_allocator
from .sharded import ShardedBankClient
from .types import BankInfo, Hits, KeyFunctionSpec, SearchQuery

__version__ = "0.1.0"

__all__ = [
    "Bank",
    "BankClient",
    "BankError",
    "BankInfo",
    "DeadlineExceeded",
    "EncoderFingerprint",
    "EncoderMismatch",
    "FailedPrecondition",
    "Hits",
    "Internal",
    "InvalidArgument",
    "KeyFunctionSpec",
    "NotFound",
    "ResourceExhausted",
    "SearchQuery",
    "ShardedBankClient",
    "Unauthenticated",
    "Unavailable",
    "fingerprint_encoder",
    "sample_id_to_int",
    "tune_allocator",
]
