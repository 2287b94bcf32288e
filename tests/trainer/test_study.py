"""Tests for ``tinyalign study``: arms differ only where they should, banks stay clean,
the shuffled control never returns the true top-k, and a killed study resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from tinyalign.study import check_bank_is_clean, stage1_config, stage2_config, unit
from tinyalign.study_config import ARMS, StudyConfig, load_config, wider_connector
from tinyalign.study_report import mean_ci, paired, t_quantile

TINY_LLM_STEPS = 20  # the tiny LM only needs to exist here


@pytest.fixture(scope="module")
def study_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bankd.build.demo_data import DemoDataConfig, generate
    from bankd.build.demo_instruct import InstructConfig, generate_instruct

    out = tmp_path_factory.mktemp("study-data")
    config = DemoDataConfig(out=out, n=32, heldout=0, image_size=48)
    generate(config, progress=False)
    generate_instruct(config, InstructConfig(instruct=24, eval_images=3, corpus=30), progress=False)
    return out


def _config(data: Path, **kw) -> StudyConfig:
    fields = dict(
        pretrain_data=str(data / "data.json"),
        instruct_data=str(data / "instruct.json"),
        questions=str(data / "eval" / "questions.jsonl"),
        answers=str(data / "eval" / "answers_gt.jsonl"),
        image_folder=str(data),
        tiny_llm_corpus=str(data / "lm_corpus.json"),
        arms=("baseline", "tinyalign"),
        fractions=(1.0,),
        seeds=(0,),
        tiny_llm_steps=TINY_LLM_STEPS,
        perceiver_steps=2,
        stage1_steps=2,
        stage2_epochs=0.25,
        stage2_lr=1e-3,
        batch_size=4,
        max_length=160,
        max_new_tokens=2,
        eval_batch_size=4,
        device="cpu",
    )
    fields.update(kw)
    return StudyConfig(**fields)


PLAN = {"out": "/s", "banks": {"main": "/b/bank.faiss"}, "wider_spec": "mlp2x_gelu_h300"}


@pytest.mark.parametrize("arm", [a for a in ARMS if a != "baseline"])
def test_arms_differ_only_where_they_should(study_data: Path, arm: str) -> None:
    config = _config(study_data, ood_data=str(study_data / "data.json"))
    plan = {
        **PLAN,
        "banks": {k: f"/b/{k}.faiss" for k in ("main", "untrained", "ood", "mismatched")},
    }
    allowed = {"retrieval", "bank", "connector", "top_k", "retrieval_mode"}
    allowed |= {"allow_encoder_mismatch"} if arm == "mismatched-encoder" else set()
    base = asdict(stage1_config(config, "baseline", 0, plan, Path("/x")))
    other = asdict(stage1_config(config, arm, 0, plan, Path("/x")))
    assert {k for k in base if base[k] != other[k]} <= allowed
    # stage 2: the same data, fraction, seed (so subset and batch order), epochs and lr
    base2 = asdict(stage2_config(config, "baseline", 0, 0.4, plan, Path("/y")))
    other2 = asdict(stage2_config(config, arm, 0, 0.4, plan, Path("/y")))
    diff = {k for k in base2 if base2[k] != other2[k]}
    assert diff <= {"bank", "init_from", "allow_encoder_mismatch"}
    assert other2["init_from"].endswith(f"{arm}/seed0/stage1")


def test_same_connector_initialisation_across_arms(demo) -> None:
    from tinyalign.components import build_vlm
    from tinyalign.model import TinyAlignConfig

    weights = []
    for retrieval, mode in ((False, "topk"), (True, "topk"), (True, "shuffled")):
        cfg = TinyAlignConfig(retrieval=retrieval, retrieval_mode=mode)
        model, _ = build_vlm(cfg, init_seed=3, llm_source=demo.llm_dir, progress=False)
        weights.append(model.connector.state_dict())
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])


def test_wider_adds_about_the_rag_connectors_parameters() -> None:
    for vision_dim, width in ((64, 128), (1152, 896), (768, 2560)):
        spec, added, rag = wider_connector("mlp2x_gelu", "mlp2x_gelu", vision_dim, width, 96)
        assert spec.startswith("mlp2x_gelu_h")
        assert abs(added - rag) <= 0.1 * rag, (spec, added, rag)


def test_shuffled_never_returns_the_true_top_k(demo) -> None:
    from bankd.models.encoders import load_encoder
    from bankd.search.local import LocalBank
    from tinyalign.retrieval import Retriever

    vision = load_encoder("tiny", seed=0)
    features = torch.randn(16, vision.num_patches, vision.vision_dim)
    own = torch.arange(16)
    true = Retriever.from_bank(LocalBank(demo.bank), vision, 5).retrieve(features, own)
    shuffled = Retriever.from_bank(LocalBank(demo.bank), vision, 5, mode="shuffled", seed=1)
    for _ in range(3):
        got = shuffled.retrieve(features, own)
        assert got.mask.all()
        for t, s, i in zip(true.ids.tolist(), got.ids.tolist(), own.tolist(), strict=True):
            assert not set(t) & set(s) and i not in s
    with pytest.raises(ValueError, match="unknown retrieval mode"):
        Retriever.from_bank(LocalBank(demo.bank), vision, 5, mode="random")


def test_bank_with_an_instruction_image_is_refused(study_data: Path, tmp_path: Path) -> None:
    from bankd.build.config import BuildConfig
    from bankd.build.pipeline import build_bank

    config = _config(study_data)
    mixed = json.loads((study_data / "data.json").read_text())[:8]
    mixed += [s for s in json.loads((study_data / "instruct.json").read_text()) if "image" in s][:1]
    (tmp_path / "mixed.json").write_text(json.dumps(mixed))
    index = build_bank(
        BuildConfig(
            data=tmp_path / "mixed.json",
            image_folder=study_data,
            out=tmp_path / "bank" / "bank.faiss",
            perceiver_steps=1,
            workers=0,
            device="cpu",
            progress=False,
        )
    )
    with pytest.raises(ValueError, match="instruction/eval images"):
        check_bank_is_clean(index, str(tmp_path / "mixed.json"), config)


def test_unit_runs_once_and_redoes_an_unfinished_one(tmp_path: Path) -> None:
    calls = []

    def work(d: Path) -> dict:
        calls.append(d)
        (d / "partial").write_text("x")
        return {"n": len(calls)}

    assert unit(tmp_path / "u", work) == {"n": 1}
    assert unit(tmp_path / "u", work) == {"n": 1} and len(calls) == 1
    (tmp_path / "v").mkdir()  # a killed run: files, no result.json
    (tmp_path / "v" / "stale").write_text("x")
    assert unit(tmp_path / "v", work) == {"n": 2}
    assert not (tmp_path / "v" / "stale").exists()


def test_statistics() -> None:
    assert t_quantile(2) == pytest.approx(4.303) and t_quantile(200) == pytest.approx(1.972, 1e-3)
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / 3**0.5)
    d, h, n = paired({0: 0.5, 1: 0.7, 2: 0.9}, {0: 0.4, 1: 0.6, 2: 0.8})
    assert d == pytest.approx(0.1) and h == pytest.approx(0.0, abs=1e-12) and n == 3


def test_config_file(tmp_path: Path) -> None:
    (tmp_path / "s.toml").write_text(
        'pretrain_data = "d/data.json"\ninstruct_data = "d/i.json"\nquestions = "q.jsonl"\n'
        'answers = "a.jsonl"\nimage_folder = "d"\narms = ["baseline", "top1"]\nseeds = [1, 2]\n'
    )
    config = load_config(tmp_path / "s.toml")
    assert config.pretrain_data == str(tmp_path / "d" / "data.json")
    assert config.arms == ("baseline", "top1") and config.seeds == (1, 2)
    (tmp_path / "bad.toml").write_text('pretrain_data = "x"\nlearning_rate = 1\n')
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ValueError, match="unknown arms"):
        replace(config, arms=("baseline", "bigger"))
    with pytest.raises(ValueError, match="ood_data"):
        replace(config, arms=("baseline", "ood-bank"))


def test_study_resumes_after_a_kill(study_data: Path, tmp_path: Path) -> None:
    """A study killed after its first finished run redoes nothing finished on rerun."""
    cfg = _config(study_data)
    (tmp_path / "s.toml").write_text(
        "\n".join(
            f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}"
            for k, v in asdict(cfg).items()
            if v is not None
        )
    )
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "tinyalign", "study", "--config", str(tmp_path / "s.toml")]
    cmd += ["--out", str(out), "--no-progress"]
    env = {**os.environ, "TINYALIGN_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first = out / "runs" / "baseline" / "seed0" / "stage1" / "result.json"
    deadline = time.monotonic() + 300
    while not first.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert first.is_file(), proc.stderr.read().decode()[-2000:]
    stamp = first.stat().st_mtime_ns
    bank_stamp = (out / "banks" / "main" / "result.json").stat().st_mtime_ns
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert first.stat().st_mtime_ns == stamp  # not redone
    assert (out / "banks" / "main" / "result.json").stat().st_mtime_ns == bank_stamp
    for arm in ("baseline", "tinyalign"):
        result = json.loads((out / "runs" / arm / "seed0" / "frac1" / "result.json").read_text())
        assert 0.0 <= result["scores"]["overall"]["accuracy"] <= 1.0
        answers = (out / "runs" / arm / "seed0" / "frac1" / "eval" / "answers.jsonl").read_text()
        row = json.loads(answers.splitlines()[0])
        assert {"question_id", "prompt", "text", "answer_id", "model_id"} <= set(row)
    report = (out / "report.md").read_text()
    assert "| baseline | 1 |" in report and "| tinyalign | 1 |" in report
    assert (out / "accuracy_vs_fraction.png").stat().st_size > 0
    assert (out / "loss_curves.png").stat().st_size > 0
