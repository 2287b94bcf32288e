"""The TinyAlign VLM's input layout: [text before <image>, H_V, H_R (rank order), text after].

A hand-made batch mixes two image rows (one with a missing hit) and a text-only row,
right-padded; the assembled embeddings, attention mask and labels are compared with the
layout built by hand from the components.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from bankd.models.encoders import load_encoder
from tinyalign.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER_ID,
    build_prompt,
    get_template,
    tokenize_conversation,
)
from tinyalign.model import TinyAlignConfig, TinyAlignVLM, build_connector

PH, PAD = IMAGE_PLACEHOLDER_ID, 0
K = 2


@pytest.fixture(scope="module")
def vlm() -> TinyAlignVLM:
    """Tiny vision tower + a random 2-layer Qwen2 (width 64); retrieval on, top-2."""
    torch.manual_seed(0)
    llm = transformers.Qwen2ForCausalLM(
        transformers.Qwen2Config(
            vocab_size=50,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        )
    ).eval()
    vision = load_encoder("tiny", seed=0)
    return TinyAlignVLM(TinyAlignConfig(top_k=K), vision, llm).eval()


@pytest.fixture(scope="module")
def batch(vlm: TinyAlignVLM) -> dict:
    g = torch.Generator().manual_seed(1)
    p, dv = vlm.vision.num_patches, vlm.vision.vision_dim
    return {
        "input_ids": torch.tensor(
            [[5, 6, PH, 7, 8], [9, 10, 11, PAD, PAD], [PH, 12, PAD, PAD, PAD]]
        ),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]),
        "labels": torch.tensor(
            [[-100, -100, -100, 7, 8], [-100, 10, 11, -100, -100], [-100, 12, -100, -100, -100]]
        ),
        "features": torch.randn(2, p, dv, generator=g),  # image rows 0 and 2
        "image_rows": torch.tensor([0, 2]),
        "retrieved": torch.randn(2, K, 32, 96, generator=g).half(),
        "retrieved_mask": torch.tensor([[True, True], [True, False]]),  # row 2's 2nd hit missing
    }


@torch.no_grad()
def test_layout_embeddings_mask_and_labels(vlm: TinyAlignVLM, batch: dict) -> None:
    embeds, mask, labels = vlm.assemble(**batch)
    emb = vlm.llm.get_input_embeddings()
    p = vlm.vision.num_patches
    h_v = vlm.connector(batch["features"])  # (2, P, H)
    h_r = [
        torch.cat([vlm.rag_connector(batch["retrieved"][i, j].float()) for j in range(K)])
        for i in range(2)
    ]  # rank order: hit 0's 32 tokens, then hit 1's
    ids = lambda *xs: emb(torch.tensor(xs))  # noqa: E731
    rows = [
        torch.cat([ids(5, 6), h_v[0], h_r[0], ids(7, 8)]),
        ids(9, 10, 11),
        torch.cat([h_v[1], h_r[1], ids(12)]),
    ]
    width = 4 + p + 32 * K
    assert embeds.shape == (3, width, emb.embedding_dim)
    for b, row in enumerate(rows):
        torch.testing.assert_close(embeds[b, : len(row)], row, rtol=1e-5, atol=1e-6)
        assert (embeds[b, len(row) :] == 0).all(), "padding goes on the right"

    visual = p + 32 * K
    expect_mask = torch.zeros(3, width, dtype=torch.bool)
    expect_mask[0, :] = True
    expect_mask[1, :3] = True
    expect_mask[2, : 1 + visual] = True
    expect_mask[2, p + 32 : p + 64] = False  # the missing hit gets no attention
    assert torch.equal(mask, expect_mask)

    ignore = [IGNORE_INDEX]
    expect_labels = torch.full((3, width), IGNORE_INDEX)
    expect_labels[0, : 4 + visual] = torch.tensor(ignore * (2 + visual) + [7, 8])
    expect_labels[1, :3] = torch.tensor([-100, 10, 11])
    expect_labels[2, : 1 + visual] = torch.tensor(ignore * visual + [12])
    assert torch.equal(labels, expect_labels)


@torch.no_grad()
def test_generation_layout_pads_left(vlm: TinyAlignVLM, batch: dict) -> None:
    right, mask_r, _ = vlm.assemble(**{**batch, "labels": None})
    left, mask_l, labels = vlm.assemble(**{**batch, "labels": None}, pad_left=True)
    assert labels is None
    for b in range(3):
        n = int((right[b].abs().sum(-1) != 0).sum())  # real positions of row b
        torch.testing.assert_close(left[b, -n:], right[b, :n])
        assert torch.equal(mask_l[b, -n:], mask_r[b, :n])
        assert not mask_l[b, : left.shape[1] - n].any()


@torch.no_grad()
def test_missing_hits_are_not_attended(vlm: TinyAlignVLM, batch: dict) -> None:
    """Changing the values of a masked-out hit changes no logit of a real position."""
    out = vlm(**batch).logits
    changed = batch["retrieved"].clone()
    changed[1, 1] = torch.randn_like(changed[1, 1].float()).half() * 10
    out2 = vlm(**{**batch, "retrieved": changed}).logits
    _, mask, _ = vlm.assemble(**batch)
    torch.testing.assert_close(out[mask], out2[mask], rtol=1e-4, atol=1e-4)
    visible = batch["retrieved"].clone()
    visible[1, 0] = changed[1, 1]  # the same change to a present hit does matter
    out3 = vlm(**{**batch, "retrieved": visible}).logits
    assert not torch.allclose(out[mask], out3[mask], atol=1e-4)


def test_forward_gives_a_finite_loss(vlm: TinyAlignVLM, batch: dict) -> None:
    loss = vlm(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert vlm.connector[0].weight.grad is not None
    assert vlm.rag_connector[0].weight.grad is not None
    vlm.zero_grad(set_to_none=True)


def test_inconsistent_batches_are_refused(vlm: TinyAlignVLM, batch: dict) -> None:
    with pytest.raises(ValueError, match="retrieved"):
        vlm.assemble(**{**batch, "retrieved": None})
    with pytest.raises(ValueError, match="placeholder"):
        vlm.assemble(**{**batch, "image_rows": torch.tensor([0, 1])})


@torch.no_grad()
def test_tokenizer_that_adds_bos(demo, vlm: TinyAlignVLM) -> None:
    """The tiny LM's tokenizer adds <s> like Llama's: BOS first, then the visual tokens."""
    from tinyalign.llm import load_llm

    llm, tok = load_llm(str(demo.llm_dir), progress=False)
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    conv = [
        {"from": "human", "value": "<image>\nDescribe."},
        {"from": "gpt", "value": "A red star."},
    ]
    sample = tokenize_conversation(conv, tok, get_template("plain"), 64, has_image=True)
    assert sample.input_ids[:2] == [tok.bos_token_id, PH]
    assert sample.labels[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert sample.input_ids[-1] == tok.eos_token_id and sample.labels[-1] == tok.eos_token_id
    assert build_prompt("Describe.", tok, get_template("plain")) == sample.prompt_ids

    model = TinyAlignVLM(TinyAlignConfig(retrieval=False), vlm.vision, llm).eval()
    ids = torch.tensor([sample.input_ids])
    feats = torch.randn(1, vlm.vision.num_patches, vlm.vision.vision_dim)
    embeds, _, labels = model.assemble(
        ids, torch.ones_like(ids), torch.tensor([sample.labels]), feats, torch.tensor([0])
    )
    emb = llm.get_input_embeddings()
    p = vlm.vision.num_patches
    torch.testing.assert_close(embeds[0, 0], emb(torch.tensor(tok.bos_token_id)))
    torch.testing.assert_close(embeds[0, 1 : 1 + p], model.connector(feats)[0])
    torch.testing.assert_close(embeds[0, 1 + p :], emb(torch.tensor(sample.input_ids[2:])))
    assert (labels[0, : 1 + p] == IGNORE_INDEX).all()
    assert labels[0, 1 + p :].tolist() == sample.labels[2:]


def test_build_connector() -> None:
    x = torch.randn(3, 7, 16)
    assert build_connector("linear", 16, 8)(x).shape == (3, 7, 8)
    mlp = build_connector("mlp2x_gelu", 16, 8)
    assert mlp(x).shape == (3, 7, 8) and len(mlp) == 3
    with pytest.raises(ValueError, match="unknown connector 'mlp9x_relu'"):
        build_connector("mlp9x_relu", 16, 8)
