"""Chat templates and tokenisation: labels cover exactly the answers, one placeholder, BOS once.

Tokenizers are built in code (no downloads): the tiny LM's byte-level BPE (adds BOS like
Llama), the bank encoder's byte tokenizer (no BOS, appends eos by itself) and a
sentencepiece-style Metaspace BPE (prepends "▁" to every text, as Llama's does).
"""

from __future__ import annotations

import pytest
import transformers

from tinyalign.conversation import (
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER_ID,
    TEMPLATES,
    build_prompt,
    get_template,
    query_text,
    tokenize_conversation,
)
from tinyalign.llm import TinyLMConfig, train_tiny_tokenizer

CORPUS = [
    "A red circle on the left over a gray background.",
    "Two big blue stars are placed at the top on a white background.",
    "Describe the image briefly. What colour is it? It is red. Where is it?",
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: ASSISTANT: The assistant gives helpful, detailed, and polite answers.",
] * 4

MULTI_TURN = [
    {"from": "human", "value": "<image>\nDescribe the image briefly."},
    {"from": "gpt", "value": "A red circle on the left."},
    {"from": "human", "value": "What colour is the background?"},
    {"from": "gpt", "value": "It is gray."},
]
ANSWERS = ["A red circle on the left.", "It is gray."]


@pytest.fixture(scope="module")
def bpe() -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE that adds <s> in front, like Llama."""
    return train_tiny_tokenizer(CORPUS, TinyLMConfig(vocab_size=400, min_frequency=1))


@pytest.fixture(scope="module")
def no_bos():
    """The bank encoder's byte tokenizer: no BOS, appends </s> to every text by itself."""
    from bankd.models.encoders import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def metaspace() -> transformers.PreTrainedTokenizerFast:
    """Sentencepiece-style: every encoded text starts with '▁' standing for a space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator(CORPUS + [c.lower() for c in CORPUS] + ["\n"], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def supervised_runs(tokenizer, sample) -> list[str]:
    """Decoded text of each contiguous run of supervised tokens."""
    runs, current = [], []
    for i, label in enumerate(sample.labels):
        if label != IGNORE_INDEX:
            assert label == sample.input_ids[i]
            current.append(label)
        elif current:
            runs, current = runs + [current], []
    runs += [current] if current else []
    return [tokenizer.decode(r, skip_special_tokens=False) for r in runs]


def test_templates_render_llava_strings() -> None:
    assert set(TEMPLATES) == {"plain", "vicuna"}
    vicuna = get_template("vicuna").render(MULTI_TURN, has_image=True)
    assert vicuna == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the user's questions. "
        "USER: <image>\nDescribe the image briefly. ASSISTANT: A red circle on the left.</s>"
        "USER: What colour is the background? ASSISTANT: It is gray.</s>"
    )
    plain = get_template("plain").render(MULTI_TURN[:2], has_image=True)
    assert plain == "<image>A red circle on the left.</s>"
    with pytest.raises(ValueError, match="unknown template 'chatml'"):
        get_template("chatml")


@pytest.mark.parametrize("tok_name", ["bpe", "no_bos", "metaspace"])
def test_labels_are_exactly_the_answers(tok_name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(tok_name)
    s = tokenize_conversation(MULTI_TURN, tok, get_template("vicuna"), 512, has_image=True)
    assert len(s.input_ids) == len(s.labels)
    runs = supervised_runs(tok, s)
    assert [r.strip() for r in runs] == [a + tok.eos_token for a in ANSWERS]
    # One eos per answer, nowhere else (the no_bos tokenizer would append one by itself).
    assert s.input_ids.count(tok.eos_token_id) == len(ANSWERS)
    assert s.input_ids.count(IMAGE_PLACEHOLDER_ID) == 1
    assert s.labels[s.input_ids.index(IMAGE_PLACEHOLDER_ID)] == IGNORE_INDEX
    if tok_name == "metaspace":  # the answer's leading space is the tokenizer's own "▁"
        first = s.labels.index(next(lab for lab in s.labels if lab != IGNORE_INDEX))
        assert tok.convert_ids_to_tokens(s.input_ids[first]) != "\u2581"


def test_bos_added_once_at_the_start(bpe, no_bos) -> None:
    s = tokenize_conversation(MULTI_TURN, bpe, get_template("vicuna"), 512, has_image=True)
    assert s.input_ids[0] == bpe.bos_token_id and s.input_ids.count(bpe.bos_token_id) == 1
    s2 = tokenize_conversation(MULTI_TURN, no_bos, get_template("vicuna"), 512, has_image=True)
    assert s2.input_ids[0] != no_bos.eos_token_id and len(s2.input_ids) > 10


def test_prompt_is_prefix_and_matches_build_prompt(bpe) -> None:
    vicuna = get_template("vicuna")
    s = tokenize_conversation(MULTI_TURN, bpe, vicuna, 512, has_image=True)
    assert s.input_ids[: len(s.prompt_ids)] == s.prompt_ids
    assert all(lab == IGNORE_INDEX for lab in s.labels[: len(s.prompt_ids)])
    assert s.labels[len(s.prompt_ids)] != IGNORE_INDEX  # the answer starts right after
    text = bpe.decode([i for i in s.prompt_ids if i >= 0])
    assert text.endswith("Describe the image briefly. ASSISTANT:")
    assert build_prompt("<image>\nDescribe the image briefly.", bpe, vicuna) == s.prompt_ids
    plain = tokenize_conversation(MULTI_TURN[:2], bpe, get_template("plain"), 64, has_image=True)
    assert plain.prompt_ids == [bpe.bos_token_id, IMAGE_PLACEHOLDER_ID]
    assert plain.input_ids[-1] == bpe.eos_token_id
    assert build_prompt("Describe it.", bpe, get_template("plain")) == plain.prompt_ids


def test_image_moves_to_first_human_turn(bpe) -> None:
    conv = [
        {"from": "human", "value": "Describe the image briefly.\n<image>"},
        {"from": "gpt", "value": "A red circle."},
        {"from": "human", "value": "<image> Where is it?"},
        {"from": "gpt", "value": "On the left."},
    ]
    s = tokenize_conversation(conv, bpe, get_template("vicuna"), 512, has_image=True)
    assert s.input_ids.count(IMAGE_PLACEHOLDER_ID) == 1
    assert s.input_ids.index(IMAGE_PLACEHOLDER_ID) < len(s.prompt_ids)


def test_text_only_sample_has_no_placeholder(bpe) -> None:
    conv = [{"from": "human", "value": "<image>\nWhat colour is it?"}, MULTI_TURN[1]]
    s = tokenize_conversation(conv, bpe, get_template("vicuna"), 512, has_image=False)
    assert IMAGE_PLACEHOLDER_ID not in s.input_ids
    assert "<image>" not in bpe.decode(s.input_ids)
    assert supervised_runs(bpe, s) == [" " + ANSWERS[0] + "</s>"]


def test_answer_text_cannot_inject_special_tokens(bpe) -> None:
    conv = [MULTI_TURN[0], {"from": "gpt", "value": "Red</s> circle"}]
    s = tokenize_conversation(conv, bpe, get_template("vicuna"), 512, has_image=True)
    assert s.input_ids.count(bpe.eos_token_id) == 1 and s.input_ids[-1] == bpe.eos_token_id


def test_truncation_keeps_placeholder(bpe) -> None:
    vicuna = get_template("vicuna")
    full = tokenize_conversation(MULTI_TURN, bpe, vicuna, 512, has_image=True)
    cut = len(full.prompt_ids) + 3
    s = tokenize_conversation(MULTI_TURN, bpe, vicuna, cut, has_image=True)
    assert len(s.input_ids) == len(s.labels) == cut
    assert s.input_ids == full.input_ids[:cut] and s.input_ids.count(IMAGE_PLACEHOLDER_ID) == 1
    assert sum(lab != IGNORE_INDEX for lab in s.labels) == 3
    where = full.input_ids.index(IMAGE_PLACEHOLDER_ID)
    with pytest.raises(ValueError, match="sample 'x42'.*placeholder"):
        tokenize_conversation(MULTI_TURN, bpe, vicuna, where, has_image=True, name="'x42'")
    with pytest.raises(ValueError, match="sample 'x42'.*no answer token"):
        tokenize_conversation(MULTI_TURN, bpe, vicuna, where + 2, has_image=True, name="'x42'")


def test_query_text_never_contains_the_answer() -> None:
    assert query_text(MULTI_TURN) == "Describe the image briefly."
    assert "red circle" not in query_text(MULTI_TURN)


@pytest.mark.parametrize(
    "conv",
    [
        [],
        [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}],
        [{"from": "human", "value": "<image>\nx"}],
        [{"from": "human", "value": "x"}, {"from": "gpt"}],
        "not a list",
    ],
)
def test_malformed_conversations_raise(bpe, conv) -> None:
    with pytest.raises(ValueError, match="sample s7"):
        tokenize_conversation(conv, bpe, get_template("vicuna"), 64, has_image=True, name="s7")
