"""Embed's bad images and Fetch's answer size: the caller's error, named, up front.

Unit cases drive ``decode_images`` with crafted files (a header declaring 8192 x 8192
pixels over a 157-byte PNG, a 400-Mpx decompression bomb, a broken PNG that makes
Pillow raise SyntaxError, truncated data, 0 bytes, not an image); the served cases
send them through a real server with the tiny encoder and check the status, the
image's index in the message and that nothing is logged with a traceback.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from PIL import Image

from bankd.serve.flags import ServiceLimits
from bankd.serve.images import decode_images
from bankd_client import errors

BUDGET = ServiceLimits().max_embed_pixels  # the server's default


def png(width: int = 64, height: int = 64, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def declaring(width: int, height: int) -> bytes:
    """A small PNG whose header (IHDR, with a valid CRC) declares width x height."""
    data = png(8, 8)
    ihdr = struct.pack(">II", width, height) + data[24:29]
    return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]


def broken_png() -> bytes:
    """An IDAT chunk whose length is wrong: Pillow raises SyntaxError('broken PNG file')."""
    data = bytearray(png())
    at = data.find(b"IDAT")
    data[at - 1] ^= 0x40
    return bytes(data)


BAD = {
    "empty": (b"", "is empty"),
    "not an image": (b"hello, world", "is not a PNG/JPEG"),
    "truncated": (png()[:120], "cannot be decoded"),
    "broken PNG": (broken_png(), "SyntaxError"),
    "header only": (png()[:20], "cannot be opened"),
    "decompression bomb": (declaring(20_000, 20_000), "DecompressionBombError"),
    "8192 x 8192": (declaring(8192, 8192), "over this server's budget"),
}


def test_good_images_decode_to_rgb() -> None:
    gray = io.BytesIO()
    Image.new("L", (10, 20), 128).save(gray, "PNG")
    out = decode_images([png(32, 16), gray.getvalue()], BUDGET)
    assert [(im.mode, im.size) for im in out] == [("RGB", (32, 16)), ("RGB", (10, 20))]


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_image_is_invalid_argument_naming_its_index(case: str) -> None:
    blob, why = BAD[case]
    with pytest.raises(errors.InvalidArgument) as e:
        decode_images([png(), png(seed=1), blob, png()], BUDGET)
    assert "image 2" in e.value.message and why in e.value.message


def test_a_bomb_is_refused_before_decoding() -> None:
    """Pillow refuses 400 Mpx at open; bankd's budget refuses far less, before Pillow."""
    with pytest.raises(errors.InvalidArgument, match=r"image 0 .*DecompressionBombError"):
        decode_images([declaring(20_000, 20_000)], max_pixels=1 << 30)
    with pytest.raises(errors.InvalidArgument, match=r"image 0 \(9000 x 9000\): 81000000"):
        decode_images([declaring(9000, 9000)], BUDGET)


def test_budget_is_summed_over_the_request_before_decoding() -> None:
    budget = 2 * 64 * 64 + 1
    assert len(decode_images([png(), png()], budget)) == 2
    # The third image is a valid one: the header sum refuses it, naming the range.
    with pytest.raises(errors.InvalidArgument, match=r"images 0\.\.2 .*12288 pixels"):
        decode_images([png(), png(), png()], budget)
    # A header declaring too much is refused even though its data would not decode:
    # nothing is decoded before the sizes are summed.
    with pytest.raises(errors.InvalidArgument, match="budget"):
        decode_images([png(), broken_png(), declaring(8192, 8192)], BUDGET)


def test_formats_that_run_external_programs_are_not_opened() -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(errors.InvalidArgument, match="image 0 is not a PNG/JPEG"):
        decode_images([eps], BUDGET)


def test_default_budget_fits_a_full_request_of_typical_images() -> None:
    limits = ServiceLimits()
    assert limits.max_embed * 336 * 336 <= limits.max_embed_pixels < 8192 * 8192
    with pytest.raises(ValueError, match="--max-embed-pixels must be >= 1"):
        ServiceLimits(max_embed_pixels=0)


# -- through a server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def embed_port(encoder_bank: Any) -> Any:
    from bankd.serve.flags import ServerConfig
    from bankd.serve.server import BankServer

    limits = dataclasses.replace(ServiceLimits(), max_embed_pixels=3 * 64 * 64)
    config = ServerConfig(
        index=str(encoder_bank.path), port=0, metrics_port=None, device="cpu", limits=limits
    )
    server = BankServer(config).start()
    try:
        yield server.port
    finally:
        server.stop(grace=0)


def test_served_embed_answers_bad_images_invalid_argument_without_traceback(
    embed_port: int, client_factory: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    client = client_factory(embed_port)
    keys = client.embed([png(seed=3), png(seed=4)])
    assert keys.shape == (2, 128) and np.allclose(np.linalg.norm(keys, axis=1), 1, atol=1e-4)
    caplog.set_level(logging.DEBUG)
    for case, (blob, why) in BAD.items():
        with pytest.raises(errors.InvalidArgument) as e:
            client.embed([png(), blob])
        assert "image 1" in e.value.message and why in e.value.message, case
    # Three valid 64 x 64 images fit the budget; a fourth does not.
    assert client.embed([png(seed=s) for s in range(3)]).shape == (3, 128)
    with pytest.raises(errors.InvalidArgument, match=r"images 0\.\.3 .*--max-embed-pixels"):
        client.embed([png(seed=s) for s in range(4)])
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not logged, [r.getMessage() for r in logged]


def test_fetch_refuses_an_answer_over_the_message_limit_up_front(
    bank: Any, server_factory: Callable[..., Any], client_factory: Callable[..., Any]
) -> None:
    limit = 1 << 20
    limits = dataclasses.replace(ServiceLimits(), max_message_bytes=limit)
    client = client_factory(server_factory(bank.path, limits=limits).port)
    service_values = 2 * 32 * 96
    fit = (limit - 4096) // service_values  # the values alone
    fit_keys = (limit - 4096) // (service_values + 4 * bank.keys.shape[1])
    ids = bank.ids[: fit + 1]
    assert client.fetch(ids[:fit]).shape == (fit, 32, 96)
    with pytest.raises(errors.InvalidArgument, match=f"{fit + 1} ids needs .* at most {fit} ids"):
        client.fetch(ids)
    with pytest.raises(errors.InvalidArgument, match=f"with keys .* at most {fit_keys} ids"):
        client.fetch(ids[: fit_keys + 1], with_keys=True)
    values, keys = client.fetch(ids[:fit_keys], with_keys=True)
    np.testing.assert_array_equal(keys, bank.keys[:fit_keys])
