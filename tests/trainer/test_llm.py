"""Loading causal LMs: the tiny LM is built once per recipe, cached, and loaded by path.

Everything is built in code or under tmp_path; no hub id is ever resolved.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

import tinyalign.llm as llm_mod
from bankd.build.demo_data import DemoDataConfig, generate
from tinyalign.llm import default_cache_dir, load_llm, texts_for_tiny_lm

STEPS = 25


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate(DemoDataConfig(out=out, n=50, heldout=5), progress=False)
    return out


@pytest.fixture(scope="module")
def texts(demo: Path) -> list[str]:
    return texts_for_tiny_lm([demo / "data.json"])


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, texts: list[str]) -> Path:
    """A cache dir holding one tiny LM built from the demo texts."""
    cache = tmp_path_factory.mktemp("cache")
    load_llm("tiny", cache_dir=cache, pretrain_texts=texts, pretrain_steps=STEPS, progress=False)
    return cache


def the_entry(cache: Path) -> Path:
    (entry,) = [p for p in cache.iterdir() if p.name.startswith("tiny-llm-")]
    return entry


def test_texts_are_captions_and_prompts_without_image(demo: Path, texts: list[str]) -> None:
    data = json.loads((demo / "data.json").read_text())
    captions = [d["conversations"][1]["value"] for d in data]
    assert set(captions) <= set(texts)
    assert not any("<image>" in t for t in texts)
    assert len(texts) == len(set(texts)) < 2 * len(data)  # repeated prompts kept once


def test_tiny_lm_is_built_pretrained_and_cached(cache: Path) -> None:
    entry = the_entry(cache)
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temp dir left
    recipe = json.loads((entry / "tinyalign_llm.json").read_text())
    assert recipe["pretrain_steps"] == STEPS
    assert recipe["loss_after"] < recipe["loss_before"] - 1.0
    # The entry is a plain checkpoint directory.
    model = transformers.AutoModelForCausalLM.from_pretrained(entry)
    tok = transformers.AutoTokenizer.from_pretrained(entry)
    assert isinstance(model, transformers.Qwen2ForCausalLM)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 4
    assert model.config.tie_word_embeddings
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids  # adds BOS like Llama
    assert tok.pad_token == "<pad>" and tok.padding_side == "right"


def test_second_call_loads_from_cache(
    cache: Path, texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _ = load_llm("tiny", cache_dir=cache, pretrain_texts=texts, pretrain_steps=STEPS)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tiny LM was rebuilt")

    monkeypatch.setattr(llm_mod, "_build_tiny", no_training)
    model, tok = load_llm("tiny", cache_dir=cache, pretrain_texts=texts, pretrain_steps=STEPS)
    state, ref = model.state_dict(), first.state_dict()
    assert state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) for k in state)
    assert model.name_or_path == str(the_entry(cache))
    # Without texts, the one entry of this recipe is found.
    again, _ = load_llm("tiny", cache_dir=cache, pretrain_steps=STEPS)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    # Other texts, seed or steps are another entry, which needs building.
    for kwargs in (
        {"pretrain_texts": texts[:-1], "pretrain_steps": STEPS},
        {"pretrain_texts": texts, "pretrain_steps": STEPS, "seed": 1},
        {"pretrain_texts": texts, "pretrain_steps": STEPS + 1},
    ):
        with pytest.raises(AssertionError, match="rebuilt"):
            load_llm("tiny", cache_dir=cache, **kwargs)


def test_tiny_lm_needs_texts_when_not_cached(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pretrain_texts"):
        load_llm("tiny", cache_dir=tmp_path, pretrain_steps=3)
    with pytest.raises(ValueError, match="empty"):
        load_llm("tiny", cache_dir=tmp_path, pretrain_texts=[], pretrain_steps=3)


def test_cache_dir_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TINYALIGN_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("TINYALIGN_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "tinyalign"


def test_local_llama_directory_without_pad_token(tmp_path: Path, cache: Path) -> None:
    """Any causal LM saved to a directory loads by path; a missing pad token becomes eos."""
    tok = transformers.AutoTokenizer.from_pretrained(the_entry(cache))
    tok.pad_token = None
    config = transformers.LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    model, loaded = load_llm(str(tmp_path / "llama"), dtype=torch.float32)
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert loaded.pad_token == loaded.eos_token and loaded.padding_side == "right"
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", ["", "/nonexistent/model/dir", "./no-such-dir", "not a model id"])
def test_unknown_names_raise_value_error(name: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LLM"):
        load_llm(name, cache_dir=tmp_path)


def test_directory_without_model_raises(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_llm(str(tmp_path / "empty"))


def test_related_texts_pick_the_most_word_sharing_others() -> None:
    texts = [
        "A red circle on a gray background.",
        "A blue square at the top.",
        "A red circle on a white background.",
        "Two blue squares at the top.",
        "What is in the image?",
    ]
    related = llm_mod.related_texts(texts, 2)
    assert related.shape == (5, 2)
    assert related[0, 0] == 2 and related[2, 0] == 0  # the two red circles
    assert related[1, 0] == 3 and related[3, 0] == 1  # the blue squares at the top
    assert all(i not in row for i, row in enumerate(related.tolist()))  # never itself
    # Chunked and unchunked scoring agree; k is capped at the number of other texts.
    assert (llm_mod.related_texts(texts, 2, chunk=2) == related).all()
    assert llm_mod.related_texts(texts[:2], 5).shape == (2, 1)


def test_corpus_texts_join_the_captions(demo: Path, texts: list[str], tmp_path: Path) -> None:
    from tinyalign.config import TrainConfig, resolve_config
    from tinyalign.llm import TINY_CORPUS_FILE, corpus_texts, tiny_lm_texts

    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(["USER: Where? ASSISTANT: left", texts[0], " "]))
    assert corpus_texts(corpus) == ["USER: Where? ASSISTANT: left", texts[0]]
    both = tiny_lm_texts([demo / "data.json"], corpus)
    assert both == texts + ["USER: Where? ASSISTANT: left"]  # captions first, no duplicates
    (tmp_path / "bad.json").write_text(json.dumps({"texts": []}))
    with pytest.raises(ValueError, match="list of strings"):
        corpus_texts(tmp_path / "bad.json")
    # stage 1 finds the demo's corpus next to the data by itself; absent, there is none
    config = TrainConfig(data=str(demo / "data.json"), out=str(tmp_path / "run"))
    assert resolve_config(config).tiny_llm_corpus is None
    (demo / TINY_CORPUS_FILE).write_text(corpus.read_text())
    try:
        assert resolve_config(config).tiny_llm_corpus == str(demo / TINY_CORPUS_FILE)
    finally:
        (demo / TINY_CORPUS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="tiny-llm-corpus"):
        resolve_config(TrainConfig(data=config.data, out=config.out, tiny_llm_corpus="none.json"))
