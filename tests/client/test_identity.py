"""The sample id -> entry id rule, pinned by test vectors.

The expected integers below were computed once, outside bankd, from the rule as the
contract states it (BLAKE2b, 8-byte digest, UTF-8, little-endian, top bit cleared), so
a change to ``sample_id_to_int`` that changes any number fails here, and the rule text
in the .proto and the docstring is checked against the numbers.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bankd_client import sample_id_to_int

ROOT = Path(__file__).resolve().parents[2]

# sample id -> (BLAKE2b-64 digest, hex; entry id)
HASHED = {
    "a": ("40f89e395b66422f", 3405396810240292928),
    "GCC_train_000000001": ("56a07c36bd08118f", 1085658593928978518),
    "coco/train2017/000000033471": ("1baf087981c70082", 144334546971176731),
    "00017x": ("05f7462da9551572", 8220570879932167941),
    "é": ("cb1abf8beff3192f", 3394012004367669963),  # UTF-8 c3 a9
    "-5": ("850a031af2fd5346", 5067673221982259845),  # a sign is not a digit
    " 17": ("67bbb7b2fc71b0ce", 5670157261003537255),  # nor is a space
    "١٢": ("1b62706de675eb32", 3669155953962410523),  # Arabic-Indic digits: not ASCII
    "9223372036854775808": ("8a409a020de86cc2", 4786455646563877002),  # 2**63: too big
}
DECIMAL = {"0": 0, "00017": 17, "9223372036854775807": 2**63 - 1, 42: 42, 2**63 - 1: 2**63 - 1}


@pytest.mark.parametrize("sample_id", sorted(HASHED))
def test_hashed_ids_match_the_vectors(sample_id: str) -> None:
    digest, expected = HASHED[sample_id]
    assert sample_id_to_int(sample_id) == expected


@pytest.mark.parametrize("sample_id", sorted(HASHED))
def test_vectors_follow_the_stated_rule(sample_id: str) -> None:
    """The rule in words, recomputed with hashlib: digest, byte order, top bit."""
    digest, expected = HASHED[sample_id]
    raw = hashlib.blake2b(sample_id.encode("utf-8"), digest_size=8).digest()
    assert raw.hex() == digest
    assert int.from_bytes(raw, "little") & 0x7FFF_FFFF_FFFF_FFFF == expected
    # The mistakes a reimplementation makes give other numbers.
    assert int.from_bytes(raw, "big") & (2**63 - 1) != expected
    truncated_512 = hashlib.blake2b(sample_id.encode("utf-8")).digest()[:8]
    assert int.from_bytes(truncated_512, "little") & (2**63 - 1) != expected


@pytest.mark.parametrize("sample_id", list(DECIMAL), ids=str)
def test_decimal_ids_keep_their_value(sample_id: str | int) -> None:
    assert sample_id_to_int(sample_id) == DECIMAL[sample_id]


def test_hashed_ids_need_bigint_in_javascript() -> None:
    """Why the contract tells JavaScript clients to use BigInt: a Number (float64)
    cannot tell most hashed ids from their neighbours."""
    big = [v for _, v in HASHED.values() if v > 2**53]
    assert len(big) >= len(HASHED) - 1
    assert any(float(v) != v for v in big)


def test_bad_ids_are_refused() -> None:
    for bad in (True, -1, 2**63, "", None, 1.5, b"17"):
        with pytest.raises(ValueError):
            sample_id_to_int(bad)


def test_rule_is_stated_with_a_vector_in_the_contract_and_docstring() -> None:
    proto = (ROOT / "proto" / "bankd" / "v1" / "bankd.proto").read_text()
    doc = sample_id_to_int.__doc__ or ""
    for text in (proto, doc):
        assert "BLAKE2b" in text and "little-endian" in text and "BigInt" in text
        assert str(HASHED["a"][1]) in text
