"""Chat templates and the tokenisation of LLaVA-format conversations into ids and labels.

A conversation is LLaVA's ``[{"from": "human", "value": "<image>\\n..."}, {"from": "gpt",
"value": "..."}, ...]``. It becomes text segments, one image slot and answers::

    vicuna:  A chat between ... questions. USER: <image>\\nDescribe it. ASSISTANT: A red star.</s>
             USER: Where? ASSISTANT: On the left.</s>
    plain:   <image>A red star.</s>

``<image>`` becomes the single sentinel id ``IMAGE_PLACEHOLDER_ID`` in ``input_ids``; the
model splices ``[H_V, H_R]`` in there and never embeds the sentinel. Labels are
``IGNORE_INDEX`` everywhere except the assistant answers and the eos that ends each.

As LLaVA does, the image is moved to the start of the first human turn wherever
``<image>`` stood, and a stray ``<image>`` in a text-only sample is dropped. Segments are
tokenised one by one without special tokens (so BOS is added once, at the start, when the
tokenizer adds one, and text can never inject an eos), which makes the generation prompt
an exact prefix of the training ids: ``build_prompt`` gives the same tokens as
``tokenize_conversation(...).prompt_ids``.
"""

from __future__ import annotations

from dataclasses import dataclass

from bankd.build.data import drop_leading_non_human

IMAGE_TOKEN = "<image>"
IMAGE_PLACEHOLDER_ID = -200
IGNORE_INDEX = -100

_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
# Sentencepiece-style tokenizers (Llama, TinyLlama) prepend "▁" to every encoded text,
# which stands for the space a segment would otherwise start with.
_SPM_SPACE = "\u2581"


@dataclass(frozen=True)
class ChatTemplate:
    """How a conversation is laid out as text.

    Turn ``t`` renders as ``user + human + assistant`` (the prompt, never supervised) and
    then ``answer_prefix + gpt`` followed by the tokenizer's eos (supervised). The first
    turn is preceded by ``system + system_sep`` when ``system`` is set. In the image turn
    the image stands right after ``user``, followed by ``image_sep`` and the human text;
    with ``image_only_prompt`` that turn's prompt is the image alone (LLaVA's "plain"
    pretraining template, which drops the instruction).
    """

    name: str
    system: str = ""
    system_sep: str = ""
    user: str = ""
    assistant: str = ""
    answer_prefix: str = ""
    image_sep: str = ""
    image_only_prompt: bool = False

    def render(self, conversations: list[dict], *, has_image: bool, eos: str = "</s>") -> str:
        """The conversation as one string, ``<image>`` and ``eos`` written out (for reading)."""
        parts = []
        for kind, text in _segments(self, parse_turns(conversations), has_image):
            parts.append(IMAGE_TOKEN if kind == "image" else eos if kind == "eos" else text)
        return "".join(parts)


TEMPLATES: dict[str, ChatTemplate] = {
    # Stage 1 on image-caption pairs: "<image>" + caption + eos.
    "plain": ChatTemplate(name="plain", assistant="\n", image_only_prompt=True),
    # Stage 2 on instruction data: LLaVA-v1.5's conv_vicuna_v1.
    "vicuna": ChatTemplate(
        name="vicuna",
        system=(
            "A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions."
        ),
        system_sep=" ",
        user="USER: ",
        assistant=" ASSISTANT:",
        answer_prefix=" ",
        image_sep="\n",
    ),
}


def get_template(name: str) -> ChatTemplate:
    """The template called ``name`` (``plain`` or ``vicuna``)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r} (choose from {sorted(TEMPLATES)})")
    return TEMPLATES[name]


@dataclass(frozen=True)
class TokenizedSample:
    """Training ids and labels of one conversation, and its generation prompt."""

    input_ids: list[int]
    labels: list[int]
    prompt_ids: list[int]  # up to and including the first turn's assistant role


def parse_turns(conversations: list[dict]) -> list[tuple[str, str]]:
    """(human, gpt) pairs with ``<image>`` removed from the human text; ValueError if malformed.

    Roles must alternate human, gpt, ... and end with gpt ("user"/"assistant" are accepted).
    A leading turn that is not from the human is dropped first, as LLaVA's preprocessing
    does (some samples of the released files open with a gpt turn).
    """
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("conversations must be a non-empty list of turns")
    conversations = drop_leading_non_human(conversations)
    if not conversations:
        raise ValueError("conversations hold no human turn")
    if len(conversations) % 2:
        raise ValueError(f"{len(conversations)} turns: expected human/gpt pairs")
    texts: list[str] = []
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} must be a dict with a string 'value', got {turn!r}")
        role = _ROLES.get(str(turn.get("from", "")).lower())
        expected = "human" if i % 2 == 0 else "gpt"
        if role != expected:
            raise ValueError(f"turn {i} is from {turn.get('from')!r}, expected {expected!r}")
        value = turn["value"]
        texts.append(value.replace(IMAGE_TOKEN, "").strip() if role == "human" else value)
    return list(zip(texts[0::2], texts[1::2], strict=True))


def query_text(conversations: list[dict]) -> str:
    """The first human turn without ``<image>``: the only text retrieval may use.

    Never includes an answer, so a training query cannot leak its own label.
    """
    for turn in conversations:
        if isinstance(turn, dict) and _ROLES.get(str(turn.get("from", "")).lower()) == "human":
            return str(turn.get("value", "")).replace(IMAGE_TOKEN, "").strip()
    raise ValueError("conversation has no human turn")


def _segments(
    template: ChatTemplate, turns: list[tuple[str, str | None]], has_image: bool
) -> list[tuple[str, str]]:
    """(kind, text) with kind in text/image/answer/eos; a turn whose gpt is None ends it."""
    segs: list[tuple[str, str]] = []
    for t, (human, gpt) in enumerate(turns):
        head = template.system + template.system_sep if t == 0 and template.system else ""
        if t == 0 and has_image and template.image_only_prompt:
            segs += [("text", head), ("image", "")]
        elif t == 0 and has_image:
            segs += [("text", head + template.user), ("image", "")]
            segs.append(("text", template.image_sep + human + template.assistant))
        else:
            segs.append(("text", head + template.user + human + template.assistant))
        if gpt is None:
            break
        segs += [("answer", template.answer_prefix + gpt), ("eos", "")]
    return segs


def _bos_to_add(tokenizer) -> int | None:
    """The BOS id when the tokenizer adds one by itself (Llama), else None (Qwen2, Phi)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _encoder(tokenizer):
    """A function text -> ids without special tokens, special-token strings kept as text."""
    first = tokenizer.tokenize("a")
    implicit_space = bool(first) and first[0].startswith(_SPM_SPACE)

    def encode(text: str) -> list[int]:
        if implicit_space and text.startswith(" "):
            text = text[1:]
        if not text:
            return []
        return list(
            tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        )

    return encode


def _tokenize_segments(segs: list[tuple[str, str]], tokenizer) -> tuple[list[int], list[int], int]:
    """ids, labels, and the length of the first turn's prompt."""
    encode = _encoder(tokenizer)
    bos = _bos_to_add(tokenizer)
    eos = tokenizer.eos_token_id
    if eos is None and any(kind == "eos" for kind, _ in segs):
        raise ValueError("the tokenizer has no eos token to end answers with")
    ids: list[int] = [] if bos is None else [bos]
    labels: list[int] = [IGNORE_INDEX] * len(ids)
    prompt_len = -1
    for kind, text in segs:
        if kind == "image":
            piece = [IMAGE_PLACEHOLDER_ID]
        elif kind == "eos":
            piece = [eos]
        else:
            piece = encode(text)
        if kind == "answer" and prompt_len < 0:
            prompt_len = len(ids)
        ids += piece
        labels += piece if kind in ("answer", "eos") else [IGNORE_INDEX] * len(piece)
    return ids, labels, len(ids) if prompt_len < 0 else prompt_len


def tokenize_conversation(
    conversations: list[dict],
    tokenizer,
    template: ChatTemplate,
    max_length: int,
    *,
    has_image: bool,
    name: str = "?",
) -> TokenizedSample:
    """ids and labels of a conversation, truncated to ``max_length`` tokens.

    ``max_length`` counts the placeholder as one token (the model replaces it with the
    visual and retrieved tokens). Truncation cuts the end; it never drops the placeholder
    and must leave at least one answer token, else ValueError naming the sample ``name``.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    try:
        turns = parse_turns(conversations)
    except ValueError as e:
        raise ValueError(f"sample {name}: {e}") from e
    ids, labels, prompt_len = _tokenize_segments(_segments(template, turns, has_image), tokenizer)
    prompt_ids = ids[:prompt_len]
    if len(ids) > max_length:
        if has_image and ids.index(IMAGE_PLACEHOLDER_ID) >= max_length:
            raise ValueError(
                f"sample {name}: the image placeholder is at token "
                f"{ids.index(IMAGE_PLACEHOLDER_ID)}, beyond max_length={max_length}"
            )
        ids, labels = ids[:max_length], labels[:max_length]
        if all(label == IGNORE_INDEX for label in labels):
            raise ValueError(
                f"sample {name}: no answer token fits in max_length={max_length} "
                f"(the first prompt alone is {prompt_len} tokens)"
            )
    return TokenizedSample(input_ids=ids, labels=labels, prompt_ids=prompt_ids)


def build_prompt(
    prompt_text: str, tokenizer, template: ChatTemplate, has_image: bool = True
) -> list[int]:
    """Generation prompt for a user message: the same ids a training sample starts with."""
    human = prompt_text.replace(IMAGE_TOKEN, "").strip()
    ids, _, _ = _tokenize_segments(_segments(template, [(human, None)], has_image), tokenizer)
    return ids
