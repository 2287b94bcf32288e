"""The causal LM of a TinyAlign VLM: any Hugging Face causal LM, or a tiny one built here.

``load_llm(name)`` accepts

* a hub id (``Qwen/Qwen2-0.5B``, ``TinyLlama/TinyLlama-1.1B-Chat-v1.0``, ``microsoft/phi-2``)
  or a local directory: ``AutoModelForCausalLM`` + ``AutoTokenizer``;
* ``"tiny"``: a 4-layer Qwen2 with a 1000-token byte-level BPE tokenizer, both trained
  here on ``pretrain_texts`` (the demo captions and the chat texts of its
  ``lm_corpus.json``, see ``tiny_lm_texts``), so the demo
  runs offline. Pretraining packs each text after its most related
  texts (in-context pretraining), so the tiny LM, like a real one, has learned to use
  related text in its context: what TinyAlign's retrieved tokens offer it. It is built
  once and cached as a normal checkpoint directory under ``$TINYALIGN_CACHE`` (default
  ``~/.cache/tinyalign``), named by a hash of everything that made it, and then loaded
  by path with the same code as a real one.

The tiny tokenizer adds BOS the way Llama's does, so the demo exercises that path of the
conversation code. Every returned tokenizer pads on the right and has a pad token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from tqdm import tqdm

from .conversation import IGNORE_INDEX, IMAGE_TOKEN
from .lora import ADAPTER_CONFIG, load_adapted

log = logging.getLogger(__name__)

TINY_NAME = "tiny"
TINY_CORPUS_FILE = "lm_corpus.json"  # next to the data: more texts for the tiny LM
DEFAULT_PRETRAIN_STEPS = 600  # in-context pretraining; ~1.4 loss on related-caption sequences
_RECIPE_FILE = "tinyalign_llm.json"
_RECIPE_VERSION = 2
_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3 in this order


@dataclass(frozen=True)
class TinyLMConfig:
    """Architecture, tokenizer and pretraining settings of the tiny LM (all hashed)."""

    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    vocab_size: int = 1000  # BPE target; the trained vocabulary may be a little smaller
    min_frequency: int = 2
    batch_size: int = 32
    max_text_tokens: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 30
    # In-context pretraining: each training sequence is a text preceded by this many of its
    # most related texts (shared words), so the LM learns to use related text in its context
    # the way a real LLM does; 0 trains on single texts.
    related_texts: int = 3


def default_cache_dir() -> Path:
    """``$TINYALIGN_CACHE`` or ``~/.cache/tinyalign``."""
    return Path(os.environ.get("TINYALIGN_CACHE") or Path.home() / ".cache" / "tinyalign")


def load_llm(
    name: str,
    *,
    cache_dir: str | Path | None = None,
    pretrain_texts: list[str] | None = None,
    seed: int = 0,
    pretrain_steps: int = DEFAULT_PRETRAIN_STEPS,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """(model, tokenizer) for ``tiny``, a local directory or a hub id; ValueError if unknown.

    ``pretrain_texts``, ``seed`` and ``pretrain_steps`` only matter for ``tiny``; its texts
    are required when no cache entry was built from them yet.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"LLM name must be a non-empty string, got {name!r}")
    if name == TINY_NAME:
        directory = tiny_lm_dir(cache_dir, pretrain_texts, seed, pretrain_steps, progress)
        model, tokenizer = _load_pretrained(str(directory), dtype)
    elif Path(name).expanduser().is_dir():
        model, tokenizer = _load_pretrained(str(Path(name).expanduser()), dtype)
    elif Path(name).exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ValueError(f"LLM {name!r} is neither 'tiny', a model directory nor a hub id")
    else:
        model, tokenizer = _load_pretrained(name, dtype)
    return model.to(device), tokenizer


def _load_pretrained(
    name: str, dtype: torch.dtype | None
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """The one loading path for real checkpoints and the cached tiny LM alike (and an
    unmerged LoRA stage 2: its adapters on the recorded base, ``lora.load_adapted``)."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        if (Path(name) / ADAPTER_CONFIG).is_file():
            model = load_adapted(name, dtype)
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name, dtype=dtype or torch.float32
            )
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load LLM {name!r}: {e}") from e
    if tokenizer.pad_token is None:
        # Padded positions are masked and labelled IGNORE_INDEX, so any existing token works.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise ValueError(f"LLM {name!r}: tokenizer has neither pad, eos nor unk token")
    tokenizer.padding_side = "right"
    n_params = sum(p.numel() for p in model.parameters())
    log.info("loaded LLM %s: %s, %.2fM parameters", name, type(model).__name__, n_params / 1e6)
    return model, tokenizer


def texts_for_tiny_lm(json_paths: list[str | Path]) -> list[str]:
    """Answers and human prompts (without ``<image>``) of LLaVA JSON files, first-seen order.

    Duplicates are dropped, so the few repeated instructions do not outweigh the captions.
    """
    seen: dict[str, None] = {}
    for path in json_paths:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(entries, list):
            raise ValueError(f"{path}: expected a JSON list of samples")
        for i, entry in enumerate(entries):
            turns = entry.get("conversations") if isinstance(entry, dict) else None
            if not isinstance(turns, list):
                raise ValueError(f"{path}: sample {i} has no 'conversations' list")
            for turn in turns:
                text = str(turn.get("value", "")).replace(IMAGE_TOKEN, "").strip()
                if text:
                    seen.setdefault(text)
    return list(seen)


def corpus_texts(path: str | Path) -> list[str]:
    """A JSON list of strings (``lm_corpus.json`` of ``bankd demo-data``): more texts for
    the tiny LM, so its tokenizer and pretraining cover the questions and answers of
    instruction data and not only captions."""
    try:
        texts = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the tiny LM corpus {path}: {e}") from e
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{path}: expected a JSON list of strings")
    return [t for t in texts if t.strip()]


def tiny_lm_texts(json_paths: list[str | Path], corpus: str | Path | None) -> list[str]:
    """What the tiny LM is built from: the texts of ``json_paths``, then ``corpus``'s."""
    texts = dict.fromkeys(texts_for_tiny_lm(json_paths))
    if corpus is not None:
        texts.update(dict.fromkeys(corpus_texts(corpus)))
    return list(texts)


def tiny_lm_dir(
    cache_dir: str | Path | None,
    texts: list[str] | None,
    seed: int,
    pretrain_steps: int,
    progress: bool = True,
    config: TinyLMConfig | None = None,
) -> Path:
    """The cache directory of the tiny LM made from these texts, built if missing."""
    config = config or TinyLMConfig()
    if pretrain_steps < 0:
        raise ValueError(f"pretrain_steps must be >= 0, got {pretrain_steps}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    texts_sha = _texts_sha256(texts) if texts is not None else None
    if texts_sha is None:
        # Without texts, the entry is found by its recipe minus the text hash.
        matches = sorted(_find_entries(root, config, seed, pretrain_steps))
        if len(matches) != 1:
            found = f"{len(matches)} tiny LMs" + (
                f" ({[m.name for m in matches]})" if matches else ""
            )
            raise ValueError(
                f"{found} for seed={seed}, pretrain_steps={pretrain_steps} in {root}: pass "
                "pretrain_texts (texts_for_tiny_lm of the training JSON) to pick or build one"
            )
        log.info("tiny LM: using cached %s", matches[0])
        return matches[0]
    recipe = _recipe(config, seed, pretrain_steps, texts_sha)
    digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]
    directory = root / f"tiny-llm-{digest}"
    if (directory / _RECIPE_FILE).is_file():
        log.info("tiny LM: using cached %s", directory)
        return directory
    if not texts:
        raise ValueError("pretrain_texts is empty: the tiny LM needs texts to train on")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=root))
    try:
        stats = _build_tiny(tmp, texts, seed, pretrain_steps, config, progress)
        (tmp / _RECIPE_FILE).write_text(json.dumps({**recipe, **stats}, indent=1) + "\n")
        try:
            os.replace(tmp, directory)  # atomic: a directory either is complete or absent
        except OSError:
            if not (directory / _RECIPE_FILE).is_file():
                raise
            log.info("tiny LM: %s was built concurrently, keeping that one", directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("tiny LM: built %s", directory)
    return directory


def _texts_sha256(texts: list[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little") + data)  # length-prefixed: unambiguous
    return h.hexdigest()


def _recipe(config: TinyLMConfig, seed: int, steps: int, texts_sha: str | None) -> dict:
    return {
        "version": _RECIPE_VERSION,
        "config": asdict(config),
        "special_tokens": list(_SPECIAL_TOKENS),
        "seed": seed,
        "pretrain_steps": steps,
        "texts_sha256": texts_sha,
    }


def _find_entries(root: Path, config: TinyLMConfig, seed: int, steps: int) -> list[Path]:
    want = _recipe(config, seed, steps, None)
    found = []
    for recipe_file in root.glob(f"tiny-llm-*/{_RECIPE_FILE}"):
        got = json.loads(recipe_file.read_text())
        if all(got.get(k) == v for k, v in want.items() if k != "texts_sha256"):
            found.append(recipe_file.parent)
    return found


def train_tiny_tokenizer(
    texts: list[str], config: TinyLMConfig
) -> transformers.PreTrainedTokenizerFast:
    """Byte-level BPE trained on ``texts``; adds ``<s>`` in front of every text, as Llama does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=config.max_position_embeddings,
        padding_side="right",
    )


def tiny_qwen2_config(config: TinyLMConfig, tokenizer) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _batch(tokenizer, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """<s> text </s>, right-padded; padding is masked and labelled IGNORE_INDEX."""
    rows = [tokenizer(t)["input_ids"][: max_tokens - 1] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids.masked_fill(mask == 0, IGNORE_INDEX),
    }


@torch.no_grad()
def _eval_loss(model, tokenizer, texts: list[str], config: TinyLMConfig) -> float:
    model.eval()
    losses = [
        model(**_batch(tokenizer, texts[i : i + config.batch_size], config.max_text_tokens)).loss
        for i in range(0, len(texts), config.batch_size)
    ]
    model.train()
    return float(torch.stack(losses).mean())


def _build_tiny(
    directory: Path,
    texts: list[str],
    seed: int,
    steps: int,
    config: TinyLMConfig,
    progress: bool,
) -> dict:
    """Train tokenizer and model, pretrain briefly, save both to ``directory``; stats."""
    start = time.perf_counter()
    tokenizer = train_tiny_tokenizer(texts, config)
    eval_texts = texts[:: max(1, len(texts) // 128)][:128]  # a fixed, spread-out subset
    threads = torch.get_num_threads()
    # A model this small runs fastest on one thread: more threads only add sync overhead
    # (up to 30x slower when the cores are shared with other processes).
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays untouched
            torch.manual_seed(seed)
            model = transformers.Qwen2ForCausalLM(tiny_qwen2_config(config, tokenizer)).float()
            n_params = sum(p.numel() for p in model.parameters())
            log.info(
                "tiny LM: vocab %d, %.2fM parameters, pretraining %d steps on %d texts",
                len(tokenizer),
                n_params / 1e6,
                steps,
                len(texts),
            )
            loss_before = _eval_loss(model, tokenizer, eval_texts, config)
            _pretrain(model, tokenizer, texts, seed, steps, config, progress)
            loss_after = _eval_loss(model, tokenizer, eval_texts, config)
    finally:
        torch.set_num_threads(threads)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    seconds = time.perf_counter() - start
    log.info("tiny LM: loss %.3f -> %.3f in %.1f s", loss_before, loss_after, seconds)
    return {
        "vocab_size_trained": len(tokenizer),
        "n_texts": len(texts),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "build_seconds": round(seconds, 2),
    }


def related_texts(texts: list[str], k: int, chunk: int = 2048) -> np.ndarray:
    """(len(texts), k) indices of each text's k most related other texts.

    Related = cosine of TF-IDF bags of lowercase words; ties go to the lower index.
    """
    vocab: dict[str, int] = {}
    rows = [
        [vocab.setdefault(w, len(vocab)) for w in re.findall(r"[a-z0-9]+", t.lower())]
        for t in texts
    ]
    tf = np.zeros((len(texts), max(1, len(vocab))), dtype=np.float32)
    for i, ids in enumerate(rows):
        np.add.at(tf[i], ids, 1.0)
    idf = np.log((1 + len(texts)) / (1 + (tf > 0).sum(0))) + 1.0
    vec = tf * idf
    vec /= np.maximum(np.linalg.norm(vec, axis=1, keepdims=True), 1e-12)
    k = min(k, len(texts) - 1)
    out = np.empty((len(texts), max(k, 0)), dtype=np.int64)
    for start in range(0, len(texts), chunk):
        sim = vec[start : start + chunk] @ vec.T
        sim[np.arange(sim.shape[0]), np.arange(start, start + sim.shape[0])] = -np.inf
        out[start : start + chunk] = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return out


def _pretrain(model, tokenizer, texts, seed, steps, config: TinyLMConfig, progress) -> None:
    """Causal LM loss on shuffled batches; AdamW, linear warmup then cosine decay.

    Each sequence is a text preceded by ``config.related_texts`` related ones, one per line
    (in-context pretraining, Shi et al. 2024: related documents in one context).
    """
    if steps == 0:
        return
    related = related_texts(texts, config.related_texts)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, max(1, steps // 10))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    model.train()
    order: list[int] = []
    bar = tqdm(range(steps), desc="tiny LM pretrain", disable=not progress)
    for _ in bar:
        if len(order) < config.batch_size:
            order += torch.randperm(len(texts), generator=gen).tolist()
        picked, order = order[: config.batch_size], order[config.batch_size :]
        sequences = ["\n".join([texts[j] for j in related[i][::-1]] + [texts[i]]) for i in picked]
        loss = model(**_batch(tokenizer, sequences, config.max_text_tokens)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
