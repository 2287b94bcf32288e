"""Model-side code of the bank: tiny encoder, key function, value compressor, probes.

All on CPU with the tiny encoder and synthetic features; nothing is downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from bankd.models.encoders import load_encoder
from bankd.models.keys import KeyConfig, KeyFunction
from bankd.models.perceiver import (
    CachedFeatures,
    FeatureBatch,
    PerceiverSpec,
    ValueCompressor,
    compress,
    train_compressor,
)
from bankd.models.probe import (
    attribute_probe,
    caption_probe,
    caption_recovery_probe,
    knn_attribute_probe,
    knn_caption_probe,
    roc_auc,
    value_spread,
)


@pytest.fixture(scope="module")
def tiny():
    return load_encoder("tiny", seed=0)


def _images(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        im = Image.new("RGB", (96, 96), (20 * i % 255, 100, 200))
        ImageDraw.Draw(im).ellipse((10 + 5 * i, 10, 40 + 5 * i, 40), fill=(255, 255 - 30 * i, 0))
        out.append(im)
    return out


# ---- encoders -------------------------------------------------------------------------


def test_tiny_encoder_is_deterministic(tiny):
    again = load_encoder("tiny", seed=0)
    assert again.vision_fingerprint() == tiny.vision_fingerprint()
    assert again.text_fingerprint() == tiny.text_fingerprint()
    other = load_encoder("tiny", seed=1)
    assert not other.vision_fingerprint().matches(tiny.vision_fingerprint())


def test_tiny_encoder_shapes(tiny):
    pixels = tiny.preprocess(_images(3))
    assert pixels.shape == (3, 3, 64, 64) and pixels.dtype == torch.float32
    feats = tiny.image_features(pixels)
    assert feats.shape == (3, tiny.num_patches, tiny.vision_dim) == (3, 64, 128)
    ids, mask = tiny.tokenize(["a red circle", "two blue squares at the top"], 48)
    assert ids.shape == mask.shape == (2, 48)
    assert int(mask[0].sum()) == len("a red circle") + 1  # bytes + </s>
    assert tiny.text_features(ids, mask).shape == (2, 48, tiny.text_dim)


def test_save_pretrained_roundtrip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "tiny")
    loaded = load_encoder(str(tmp_path / "tiny"))
    assert loaded.vision_fingerprint().matches(tiny.vision_fingerprint())
    assert loaded.text_fingerprint().matches(tiny.text_fingerprint())
    images = _images(2)
    torch.testing.assert_close(
        loaded.image_features(loaded.preprocess(images)),
        tiny.image_features(tiny.preprocess(images)),
        rtol=0,
        atol=0,
    )
    a, b = loaded.tokenize(["Hello"], 16), tiny.tokenize(["Hello"], 16)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("name", ["", "./no/such/model/dir", "/definitely/not/here"])
def test_unknown_encoder_raises(name):
    with pytest.raises(ValueError, match="encoder|name"):
        load_encoder(name)


def test_directory_without_model_raises(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path.name)):
        load_encoder(str(tmp_path))


# ---- key function ---------------------------------------------------------------------


def _patch_features(n: int, seed: int = 0, dim: int = 128) -> torch.Tensor:
    # What every image shares is the same for every call; the seed picks the images.
    common = 5.0 * torch.randn(dim, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    return common + torch.randn(n, 64, dim, generator=g)


def _fitted(config: KeyConfig | None = None, dim: int = 128) -> KeyFunction:
    kf = KeyFunction(dim, config)
    feats = _patch_features(64, seed=1, dim=dim)
    kf.fit_center([kf.pool(feats[:32]), kf.pool(feats[32:])])
    return kf


def test_keys_are_normalised_and_centering_spreads_them():
    feats = _patch_features(16)
    raw = KeyFunction(128)(feats)
    kf = _fitted()
    keys = kf(feats)
    assert keys.dtype == torch.float32 and keys.shape == (16, 128)
    torch.testing.assert_close(keys.norm(dim=-1), torch.ones(16))
    off = ~torch.eye(16, dtype=torch.bool)
    assert (raw @ raw.T)[off].mean() > 0.9  # the common component dominates
    assert (keys @ keys.T)[off].abs().mean() < 0.2  # centred: similarities spread out


def test_keys_are_batch_size_invariant():
    kf = _fitted()
    feats = _patch_features(9)
    whole = kf(feats)
    parts = torch.cat([kf(feats[:1]), kf(feats[1:4]), kf(feats[4:])])
    torch.testing.assert_close(whole, parts, rtol=0, atol=1e-6)


def test_key_function_roundtrip_is_bit_exact():
    kf = _fitted(KeyConfig(temperature=0.5))
    config, weights = kf.to_config(), kf.weights_bytes()
    assert config["name"] == "attnpool-v1" and config["dim"] == 128
    assert config["temperature"] == 0.5 and config["feature_layer"] == -2
    again = KeyFunction.from_config_and_weights(config, weights)
    feats = _patch_features(5, seed=3)
    assert torch.equal(kf(feats), again(feats))


def test_key_function_text_component():
    with pytest.raises(ValueError, match="text"):
        KeyFunction(128, KeyConfig(text_weight=0.5), text_dim=64)
    kf = KeyFunction(128, KeyConfig(text_weight=0.5), text_dim=128)
    feats, text = _patch_features(4), torch.randn(4, 10, 128)
    mask = torch.ones(4, 10)
    with_text = kf(feats, text, mask)
    torch.testing.assert_close(with_text.norm(dim=-1), torch.ones(4))
    assert not torch.allclose(with_text, KeyFunction(128)(feats))
    with pytest.raises(ValueError, match="question"):
        kf(feats)
    with pytest.raises(ValueError, match="unknown key function"):
        KeyFunction.from_config_and_weights({"name": "other"}, b"")


# ---- value compressor -----------------------------------------------------------------

SPEC = PerceiverSpec(max_text_tokens=24)


def _feature_batch(n: int, seed: int = 0, T: int = 24) -> FeatureBatch:
    """Synthetic pairs whose patch features and caption tokens share a class label."""
    g = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 4, (n,), generator=g)
    centers = torch.randn(4, 128, generator=torch.Generator().manual_seed(99))
    vision = centers[label][:, None, :] + 0.5 * torch.randn(n, 64, 128, generator=g)
    ids = 3 + (label[:, None] * 10 + torch.arange(T) % 10)
    lengths = torch.randint(T // 2, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    text = centers[label][:, None, :] + torch.randn(n, T, 128, generator=g)
    return FeatureBatch(vision, text, mask, ids.masked_fill(mask == 0, 0))


def test_compressor_shape_and_padding_invariance():
    comp = ValueCompressor(SPEC, 128, 128, 64, seed=0).eval()
    b = _feature_batch(3, T=16)
    values = compress(comp, b)
    assert values.shape == (3, 32, 96) and values.dtype == torch.float32
    # Extra padded caption positions, filled with garbage features, change nothing.
    text = torch.cat([b.text, 100 * torch.randn(3, 8, 128)], 1)
    mask = torch.cat([b.text_mask, torch.zeros(3, 8, dtype=torch.long)], 1)
    torch.testing.assert_close(compress(comp, (b.vision, text, mask)), values, atol=1e-5, rtol=0)


def test_compressor_is_seeded_and_roundtrips():
    a, b = ValueCompressor(SPEC, 128, 128, 64, seed=3), ValueCompressor(SPEC, 128, 128, 64, seed=3)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=False)
    )
    again = ValueCompressor.from_config_and_weights(a.to_config(), a.weights_bytes())
    batch = _feature_batch(2)
    assert torch.equal(compress(a, batch), compress(again, batch))


def _train(steps: int, seed: int = 0) -> tuple[ValueCompressor, list[float]]:
    comp = ValueCompressor(SPEC, 128, 128, 64, seed=0)
    data = CachedFeatures(*_feature_batch(64), batch_size=16, seed=seed)
    losses = train_compressor(comp, data, steps, 2e-3, seed, vocab_size=64, progress=False)
    return comp, losses


def test_training_reduces_loss():
    _, losses = _train(40)
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])


def test_training_is_seeded():
    a, _ = _train(4, seed=1)
    b, _ = _train(4, seed=1)
    c, _ = _train(4, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ---- probes ---------------------------------------------------------------------------


def test_roc_auc_and_spread():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert np.isnan(roc_auc(np.array([1.0, 2.0]), np.array([1, 1])))
    same = np.ones((5, 32, 96))
    assert value_spread(same) == pytest.approx(1.0)


def test_probes_read_informative_values():
    rng = np.random.default_rng(0)
    colors = ["red", "green", "blue"]
    labels = rng.integers(0, 3, 300)
    values = rng.normal(size=(300, 4, 8))
    values[np.arange(300), 0, labels] += 3.0  # the colour is written in latent 0
    attrs = [{"color": colors[i]} for i in labels]
    caps = [f"a {colors[i]} thing" for i in labels]
    r = attribute_probe(values[:200], attrs[:200], values[200:], attrs[200:])
    assert r["mean_accuracy"] > 0.9 and r["mean_chance"] < 0.5
    assert caption_probe(values[:200], caps[:200], values[200:], caps[200:]) > 0.9
    noise = rng.normal(size=values.shape)
    assert (
        attribute_probe(noise[:200], attrs[:200], noise[200:], attrs[200:])["mean_accuracy"] < 0.6
    )


def test_caption_recovery_needs_word_order_and_knn_needs_no_fitting():
    rng = np.random.default_rng(1)
    colors, shapes = ["red", "green", "blue"], ["star", "circle", "cross"]
    c, s = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    swap = rng.integers(0, 2, 300).astype(bool)  # word order varies with the sample
    caps = [
        f"{shapes[b]} of {colors[a]}" if w else f"{colors[a]} {shapes[b]}"
        for a, b, w in zip(c, s, swap, strict=True)
    ]
    attrs = [{"color": colors[a], "shape": shapes[b]} for a, b in zip(c, s, strict=True)]
    words = colors + shapes + ["of"]
    ordered = rng.normal(size=(300, 4, 8))  # latent t holds the caption's word t
    for r, cap in enumerate(caps):
        for t, w in enumerate(cap.split()):
            ordered[r, t, words.index(w)] += 3.0
    bag = rng.normal(size=(300, 4, 8))  # which words, not where: latent 0 colour, 1 shape
    bag[np.arange(300), 0, c] += 3.0
    bag[np.arange(300), 1, s] += 3.0
    fit, test = slice(0, 200), slice(200, 300)
    got = caption_recovery_probe(ordered[fit], caps[fit], ordered[test], caps[test])
    assert got["exact"] > 0.75 and got["word_accuracy"] > 0.9, got
    bag_got = caption_recovery_probe(bag[fit], caps[fit], bag[test], caps[test])
    assert bag_got["exact"] < got["exact"] - 0.25, (got, bag_got)
    knn = knn_attribute_probe(ordered[fit], attrs[fit], ordered[test], attrs[test])
    assert knn["mean_accuracy"] > 0.8 and knn["exact"] > 0.6
    noise = rng.normal(size=ordered.shape)
    assert knn_attribute_probe(noise[fit], attrs[fit], noise[test], attrs[test])["exact"] < 0.3
    assert knn_caption_probe(ordered[fit], caps[fit], ordered[test], caps[test]) > 0.9
