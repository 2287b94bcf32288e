"""Stage 1/2 training on the CPU: freezing, self-exclusion, a real bankd, checkpoints, resume,
encoder fingerprints, the no-retrieval baseline and the CLI's exit codes."""

from __future__ import annotations

import csv
import json
import math
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bankd.search.local import LocalBank
from bankd_client import BankClient, errors, sample_id_to_int
from tinyalign.cli import main
from tinyalign.components import apply_stage, build_vlm, load_vlm
from tinyalign.conversation import get_template
from tinyalign.data import VLMDataset, collate
from tinyalign.llm import load_llm, texts_for_tiny_lm
from tinyalign.model import TinyAlignConfig
from tinyalign.pipeline import Prefetcher
from tinyalign.retrieval import Retrieved, Retriever
from tinyalign.train import evaluate, train


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def fresh_model(demo: Any, retrieval: bool = True, seed: int = 0):
    """The model a fresh stage-1 run with this seed starts from."""
    cfg = TinyAlignConfig(retrieval=retrieval, top_k=2)
    texts = texts_for_tiny_lm([demo.data])
    return build_vlm(cfg, init_seed=seed, pretrain_texts=texts, tiny_llm_steps=demo.tiny_llm_steps)[
        0
    ]


def test_stage1_freezes_vision_and_llm(demo: Any, make_config: Any) -> None:
    before = fresh_model(demo)
    result = train(make_config(steps=1))
    after = result.model
    for name in ("vision", "llm"):
        for k, v in params(getattr(before, name)).items():
            assert torch.equal(v, dict(getattr(after, name).named_parameters())[k]), f"{name}.{k}"
    for name in ("connector", "rag_connector"):
        new = dict(getattr(after, name).named_parameters())
        for k, v in params(getattr(before, name)).items():
            delta = (new[k].detach() - v).abs()
            assert delta.max() > 0, f"{name}.{k} did not train"
            # one Adam step moves a weight by at most ~lr: the run started from `before`
            assert delta.max() <= 1.01e-3, f"{name}.{k} did not start from the seeded init"
    assert result.trainable["llm"] == {"trainable": 0, "frozen": result.trainable["llm"]["frozen"]}
    assert result.trainable["total"]["trainable"] == sum(
        p.numel() for n in ("connector", "rag_connector") for p in getattr(after, n).parameters()
    )


def test_stage2_trains_the_llm_too(demo: Any, make_config: Any, stage1: Path) -> None:
    before = load_vlm(stage1).model
    result = train(make_config(stage=2, init_from=str(stage1), steps=1, max_length=256, top_k=None))
    after = result.model
    assert after.config.top_k == 2 and after.config.template == "vicuna"  # from stage 1 / stage 2
    for k, v in params(before.vision).items():
        assert torch.equal(v, dict(after.vision.named_parameters())[k])
    for name in ("connector", "rag_connector", "llm"):
        new = dict(getattr(after, name).named_parameters())
        for k, v in params(getattr(before, name)).items():
            assert not torch.equal(v, new[k]), f"{name}.{k} did not train"
    assert result.trainable["llm"]["frozen"] == 0
    out = Path(result.out)
    assert (out / "llm" / "model.safetensors").is_file() and (
        out / "llm" / "tokenizer.json"
    ).is_file()
    reloaded = load_vlm(out).model
    for k, v in after.llm.state_dict().items():
        assert torch.equal(v, reloaded.llm.state_dict()[k]), k


def test_apply_stage_rejects_unknown_stage(demo: Any) -> None:
    model = fresh_model(demo, retrieval=False)
    counts = apply_stage(model, 2)
    assert "rag_connector" not in counts and counts["vision"]["trainable"] == 0
    with pytest.raises(ValueError, match="unknown stage"):
        apply_stage(model, 3)


class SpyBank:
    """Wraps a bank; records every search: query keys, exclusions and returned ids."""

    def __init__(self, bank: Any) -> None:
        self.bank = bank
        self.calls: list[tuple[np.ndarray, list[list[int]], np.ndarray]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bank, name)

    def search(self, keys: Any, k: int = 5, *, exclude_ids: Any = None, **kw: Any) -> Any:
        hits = self.bank.search(keys, k, exclude_ids=exclude_ids, **kw)
        self.calls.append((np.asarray(keys), [list(e) for e in exclude_ids], np.asarray(hits.ids)))
        return hits


@pytest.mark.parametrize("where", ["in-process", "bankd"])
def test_no_sample_retrieves_itself(
    demo: Any, make_config: Any, bank_server: Any, where: str
) -> None:
    if where == "in-process":
        bank = LocalBank(demo.bank)
    else:
        bank = BankClient(f"127.0.0.1:{bank_server.port}", timeout=30)
        bank.wait_ready(10)
    spy = SpyBank(bank)
    # mixed.json: 24 pairs that are in the bank + 8 text-only samples; 2 passes over it
    # held-out evaluation on the same file: its searches exclude their own sample as well
    cfg = make_config(
        data=str(demo.mixed),
        eval_data=str(demo.mixed),
        steps=4,
        grad_accum=2,
        llm=str(demo.llm_dir),
    )
    train(cfg, bank=spy)
    bank_keys = np.load(str(demo.bank).replace(".faiss", ".keys.npy"), allow_pickle=False)
    bank_ids = np.load(str(demo.bank).replace(".faiss", ".ids.npy"), allow_pickle=False)
    text_only = {sample_id_to_int(f"text-{i}") for i in range(8)}
    seen = 0
    for keys, exclude, ids in spy.calls:
        scores = keys @ bank_keys.T
        own = bank_ids[scores.argmax(1)]  # a training image's query key is its own bank key
        assert np.allclose(scores.max(1), 1.0, atol=1e-4)
        assert [e for (e,) in exclude] == own.tolist(), "each query excludes its own sample"
        assert not (ids == own[:, None]).any(), "a sample retrieved its own entry"
        assert not text_only & {e for (e,) in exclude}, "text-only samples are never searched"
        assert (ids >= 0).all()
        # the test can fail: without exclusion the own entry comes first
        unexcluded = np.asarray(bank.search(keys, 2, with_values=False).ids)
        assert (unexcluded[:, 0] == own).all()
        seen += len(keys)
    assert seen == 4 * 8 * 24 // 32 + 24  # 4 steps x 8 samples (24 of 32 with an image) + eval
    bank.close()


def test_retrieval_is_prefetched_one_batch_ahead(demo: Any) -> None:
    """Batch t+1's search is submitted before batch t is handed to the step."""
    model = fresh_model(demo)
    submitted: list[list[int]] = []

    class CountingRetriever:
        feature_precision = "fp32"

        def submit(
            self, features: torch.Tensor, sample_ids: torch.Tensor, texts: list[str] | None = None
        ) -> Future:
            submitted.append(sample_ids.tolist())
            n = len(sample_ids)
            done: Future = Future()
            done.set_result(
                Retrieved(
                    torch.zeros(n, 2, 32, 96, dtype=torch.float16),
                    torch.ones(n, 2, dtype=torch.bool),
                    torch.zeros(n, 2, dtype=torch.long),
                    0.0,
                )
            )
            return done

    ds = VLMDataset(
        demo.data,
        demo.images,
        load_vlm_tokenizer(demo),
        get_template("plain"),
        model.vision.preprocess,
        max_length=64,
    )
    raws = [collate([ds[i] for i in range(4 * b, 4 * b + 4)], pad_token_id=0) for b in range(3)]
    seen = []
    for batch, raw in zip(
        Prefetcher(model, CountingRetriever(), torch.device("cpu"))(raws), raws, strict=True
    ):
        seen.append(len(submitted))
        assert batch.retrieved is not None and batch.retrieved.shape == (4, 2, 32, 96)
        assert torch.equal(batch.sample_ids, raw["sample_ids"])
    assert seen == [2, 3, 3]  # when batch t is handed out, t+1's search is already submitted
    assert submitted == [r["sample_ids"].tolist() for r in raws]  # each excludes itself


def load_vlm_tokenizer(demo: Any) -> Any:
    return load_llm(str(demo.llm_dir), progress=False)[1]


def test_evaluate_is_a_token_weighted_mean(demo: Any) -> None:
    """Batch size does not change the held-out loss (a mean of batch means would)."""
    model = fresh_model(demo, retrieval=False).eval()
    ds = VLMDataset(
        demo.heldout,
        demo.images,
        load_vlm_tokenizer(demo),
        get_template("plain"),
        model.vision.preprocess,
        max_length=64,
    )
    whole = evaluate(model, ds, batch_size=len(ds))
    assert math.isfinite(whole)
    assert evaluate(model, ds, batch_size=3) == pytest.approx(whole, rel=1e-5)


def test_training_against_a_bankd_server(make_config: Any, bank_server: Any) -> None:
    result = train(make_config(bank=f"127.0.0.1:{bank_server.port}", steps=3))
    assert result.completed and len(result.losses) == 3
    assert all(math.isfinite(x) for x in result.losses)
    with (Path(result.out) / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["retrieval_wait_ms"]) >= 0 and float(r["samples_per_s"]) > 0 for r in rows)
    saved = json.loads((Path(result.out) / "train_config.json").read_text())
    assert saved["lr"] == 1e-3 and saved["template"] == "plain" and saved["retrieval"] is True


@torch.no_grad()
def test_saved_model_gives_identical_logits(demo: Any, make_config: Any) -> None:
    result = train(make_config(steps=2))  # trains with grad on inside no_grad
    trained = result.model.eval()
    bank = LocalBank(demo.bank)
    retriever = Retriever.from_bank(bank, trained.vision, 2)
    ds = VLMDataset(
        demo.heldout,
        demo.images,
        load_vlm(result.out).tokenizer,
        get_template("plain"),
        trained.vision.preprocess,
        max_length=64,
    )
    raw = collate([ds[i] for i in range(4)], pad_token_id=0)
    batch = next(Prefetcher(trained, retriever, torch.device("cpu"))([raw]))
    expected = trained(**batch.model_inputs()).logits
    ckpt = Path(result.out) / "checkpoints" / "step-0000002"
    for directory in (result.out, ckpt):
        loaded = load_vlm(directory).model
        assert loaded.llm is not trained.llm
        torch.testing.assert_close(loaded(**batch.model_inputs()).logits, expected, rtol=0, atol=0)
    retriever.close()


def test_resume_equals_uninterrupted(demo: Any, make_config: Any, tmp_path: Path) -> None:
    # 32 samples (data_fraction 0.5), 4 x 2 per step: 4 steps an epoch; 6 steps cross an epoch
    common = dict(steps=6, batch_size=4, grad_accum=2, data_fraction=0.5, save_every=2)
    full = train(make_config(out=str(tmp_path / "full"), **common))
    first = train(make_config(out=str(tmp_path / "parts"), stop_after=3, **common))
    assert not first.completed and first.steps == 3
    assert not (tmp_path / "parts" / "config.json").exists(), "no final model before the end"
    second = train(make_config(out=str(tmp_path / "parts"), resume=True, **common))
    assert second.completed and second.steps == 6
    np.testing.assert_allclose(first.losses, full.losses[:3], rtol=1e-6)
    np.testing.assert_allclose(second.losses, full.losses, rtol=1e-5, atol=1e-6)
    with (tmp_path / "parts" / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "parts" / "checkpoints").iterdir()) == [
        "step-0000004",
        "step-0000006",
    ]  # keep_checkpoints=2
    for k, v in full.model.connector.state_dict().items():
        torch.testing.assert_close(second.model.connector.state_dict()[k], v, rtol=1e-5, atol=1e-6)


def test_mismatched_encoder_is_refused_unless_allowed(make_config: Any, capsys: Any) -> None:
    # the bank was built with the tiny encoder of seed 0; this VLM's tower has seed 1
    with pytest.raises(errors.EncoderMismatch, match="allow-encoder-mismatch"):
        train(make_config(vision_seed=1))
    result = train(make_config(vision_seed=1, allow_encoder_mismatch=True, steps=1))
    assert result.completed and math.isfinite(result.final_loss)
    cfg = make_config()
    code = main(
        [
            "pretrain",
            "--data",
            cfg.data,
            "--bank",
            cfg.bank,
            "--out",
            cfg.out,
            "--vision-seed",
            "1",
            "--steps",
            "1",
            "--workers",
            "0",
            "--no-progress",
            "--tiny-llm-steps",
            "99999",
        ]
    )  # fails before any LLM is built
    assert code == 2 and "encoder mismatch" in capsys.readouterr().err


def test_no_retrieval_never_contacts_a_bank(demo: Any, make_config: Any) -> None:
    # nothing listens on port 9: any contact would fail
    result = train(make_config(retrieval=False, bank="127.0.0.1:9", bank_patience=0, steps=2))
    assert result.completed and result.model.rag_connector is None
    assert all(math.isfinite(x) for x in result.losses)
    # the baseline starts from the same connector as the retrieval model (fair comparison)
    with_rag, without = fresh_model(demo, retrieval=True), fresh_model(demo, retrieval=False)
    for k, v in with_rag.connector.state_dict().items():
        assert torch.equal(v, without.connector.state_dict()[k])


def test_cli_errors_exit_2(demo: Any, make_config: Any, tmp_path: Path, capsys: Any) -> None:
    cfg = make_config()
    base = ["--out", str(tmp_path / "x"), "--steps", "1", "--workers", "0", "--no-progress"]
    assert (
        main(["pretrain", "--data", str(tmp_path / "missing.json"), "--bank", cfg.bank, *base]) == 2
    )
    assert "missing.json not found" in capsys.readouterr().err
    assert main(["pretrain", "--data", cfg.data, *base]) == 2
    assert "--bank" in capsys.readouterr().err
    assert (
        main(
            [
                "pretrain",
                "--data",
                cfg.data,
                "--bank",
                "127.0.0.1:9",
                "--bank-patience",
                "0.5",
                *base,
            ]
        )
        == 2
    )
    assert "unreachable" in capsys.readouterr().err
    assert (
        main(["finetune", "--data", cfg.data, "--from", str(tmp_path), "--bank", cfg.bank, *base])
        == 2
    )
    assert "not a TinyAlign model directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--data", cfg.data, *base])  # no --from
    assert e.value.code == 2


def test_cli_pretrain_baseline(demo: Any, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "baseline"
    code = main(
        [
            "pretrain",
            "--data",
            str(demo.data),
            "--out",
            str(out),
            "--no-retrieval",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "64",
            "--workers",
            "0",
            "--tiny-llm-steps",
            str(demo.tiny_llm_steps),
            "--eval-data",
            str(demo.heldout),
            "--no-progress",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "held-out loss" in capsys.readouterr().out
    assert {"config.json", "connector.safetensors", "train_config.json", "metrics.csv"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "rag_connector.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["retrieval"] is False
