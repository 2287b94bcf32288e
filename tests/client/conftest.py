"""Shared by the client tests: a BankInfo with every field set, and the fingerprint of
the encoder it records."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from bankd_client import BankInfo, EncoderFingerprint, KeyFunctionSpec

FP = EncoderFingerprint("tiny", "c" * 64, "w" * 64)


@pytest.fixture
def encoder_fp() -> EncoderFingerprint:
    """The vision encoder ``make_info()`` records."""
    return FP


@pytest.fixture
def make_info() -> Callable[..., BankInfo]:
    """make_info(**overrides): a BankInfo with every field set (vision encoder: encoder_fp)."""

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

    return _info
