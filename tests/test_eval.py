"""Evaluation: the Fréchet distance against closed forms, the shipped classifier, the report, the demo."""

import json

import numpy as np
import pytest
import torch

from fewstep.eval.metrics import (
    DigitFeatures,
    RandomConvFeatures,
    digit_accuracy,
    feature_stats,
    frechet_distance,
    frechet_distance_between,
)
from fewstep.eval.mnist import caption_for, label_from_prompt, split_indices


def test_frechet_distance_closed_forms():
    # 1-D: (m1 − m2)² + s1 + s2 − 2√(s1 s2)
    assert frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) == pytest.approx(4 + 4 + 9 - 2 * 6)
    # diagonal covariances: per-dimension sum
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 1.0])
    expected = 1 + (1 + 4 - 2 * 2) + (4 + 1 - 2 * 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected)  # symmetric
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_feature_stats_match_numpy():
    f = torch.randn(50, 3, dtype=torch.float64)
    mu, sigma = feature_stats(f)
    assert np.allclose(mu, f.numpy().mean(0)) and np.allclose(sigma, np.cov(f.numpy(), rowvar=False))


def _heldout():
    from fewstep.demo import SUBSET, eval_reference

    return eval_reference(), torch.from_numpy(np.load(SUBSET)["eval_labels"].astype(np.int64))


def test_shipped_classifier_reads_heldout_digits():
    images, labels = _heldout()
    assert digit_accuracy(images, labels) >= 0.98  # recorded: 0.989 (digit_classifier.json)


@pytest.mark.parametrize("extractor", [DigitFeatures, RandomConvFeatures])
def test_distance_is_near_zero_for_a_set_and_large_for_blank_images(extractor):
    images, _ = _heldout()
    ex = extractor()
    a, b = images[:500], images[500:]
    same = frechet_distance_between(ex, a, a)
    halves = frechet_distance_between(ex, a, b)  # two samples of one distribution
    blank = frechet_distance_between(ex, a, torch.zeros_like(a) + 0.01 * torch.rand_like(a))
    assert same < 1e-6 and halves < blank / 5 and blank > 100 * max(halves, 1e-3) / 10


def test_captions_and_split():
    for d in range(10):
        assert label_from_prompt(caption_for(d)) == d
    assert label_from_prompt("a photo of a cat") is None
    tr, ev = split_indices(10000)
    assert len(tr) == 9000 and len(ev) == 1000 and not set(tr) & set(ev)


def test_write_mnist_folder(tmp_path):
    from PIL import Image

    from conftest import SHARED
    from fewstep.eval.mnist import write_mnist_folder

    root = SHARED / "data" / "mnist"
    if not root.is_dir():
        pytest.skip(f"MNIST files not at {root} (a developer checkout has them in ../shared)")
    out = write_mnist_folder(root, tmp_path / "m", "eval", limit=20)
    assert len(list(out.glob("*.png"))) == 20 and len(list(out.glob("*.txt"))) == 20
    assert Image.open(out / "00000.png").size == (32, 32)
    assert (out / "00000.txt").read_text().startswith("a handwritten digit ")


def test_eval_report_on_tiny_models(tiny_teacher, caption_folder, tmp_path):
    from conftest import run_args
    from fewstep.cli import main
    from fewstep.eval.run import EvalRun, evaluate, generate, plan_runs

    student = tmp_path / "student"
    assert main(["distill", *run_args(tiny_teacher, caption_folder, student, max_train_steps=1)]) == 0
    runs = plan_runs([("teacher", str(tiny_teacher)), ("student", str(student))], [1, 2], [4], ["ddim"])
    assert [(r.label, r.scheduler, r.steps) for r in runs] == [
        ("teacher", "ddim", 4), ("teacher", "ddim", 1), ("teacher", "ddim", 2),
        ("student", "lcm", 1), ("student", "lcm", 2)]
    n = 12
    # The reference is exactly what the first run generates: its distance must be ~0.
    from fewstep.eval.run import make_prompts

    ref, _ = generate(EvalRun("teacher", str(tiny_teacher), "ddim", 4, 1.0), make_prompts(n, None), list(range(n)),
                      None, 6, "cpu", {})
    res = evaluate(runs, ref, RandomConvFeatures(), n, tmp_path / "report", batch_size=6)
    assert res[0].frechet_distance < 1e-6
    assert all(r.frechet_distance > 1e-6 for r in res[1:])  # other samplers: other images
    assert all(r.seconds_per_image > 0 and 0 <= r.digit_accuracy <= 1 for r in res)
    for f in ("report.md", "results.json", "grid.png", "distance_vs_steps.png"):
        assert (tmp_path / "report" / f).is_file(), f
    data = json.loads((tmp_path / "report" / "results.json").read_text())
    assert len(data["results"]) == 5 and data["meta"]["num_images"] == n


def test_demo_code_path_on_a_small_budget(tmp_path, monkeypatch):
    """A real SIGINT after the first step stops the demo with a checkpoint (no evaluation); running it
    again continues from that checkpoint and finishes (tests/test_demo.py does the same through the command)."""
    import os
    import signal

    from fewstep.demo import run_demo
    from fewstep.training.trainer import Trainer

    step = Trainer.step

    def interrupted(self):
        logs = step(self)
        if self.state.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered to this process while it trains
        return logs

    monkeypatch.setattr(Trainer, "step", interrupted)
    kw = dict(max_train_steps=2, num_images=10, steps=(1,), extra={"validation_steps": 2, "train_batch_size": 4})
    s = run_demo(str(tmp_path / "demo"), **kw)
    assert s["stopped"] and s["step"] == 1 and not (tmp_path / "demo" / "report").exists()
    assert (tmp_path / "demo" / "student" / "checkpoint-1").is_dir()
    monkeypatch.undo()
    s = run_demo(str(tmp_path / "demo"), **kw)
    assert (tmp_path / "demo" / "student" / "unet" / "config.json").is_file()
    assert (tmp_path / "demo" / "student" / "validation" / "step-0000002.png").is_file()
    assert (tmp_path / "demo" / "report" / "report.md").is_file()
    assert not s["stopped"] and s["teacher_reference"] > 0
    row = s["steps"][1]
    assert row["student"][0] > 0 and row["student"][1] > 0  # distance to real digits, to the teacher's samples
    assert set(row["baselines"]) == {"ddim", "dpm++", "euler"} and all(r > 0 and t > 0 for r, t in row["baselines"].values())
    data = json.loads((tmp_path / "demo" / "report" / "results.json").read_text())
    ref = [r for r in data["results"] if r["scheduler"] == "ddim" and r["steps"] == 25]
    assert len(ref) == 1 and ref[0]["fd_teacher"] < 1e-6  # the reference against itself


def test_clip_score_matches_its_definition(tmp_path):
    """A tiny random CLIPModel stands in for a real one: the score is 100·max(cos, 0) of its embeddings."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from fewstep.eval.metrics import ClipScore
    from fewstep.testing import write_clip_tokenizer

    tok_dir = write_clip_tokenizer(tmp_path / "clip", model_max_length=16)
    tok = CLIPTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=16,
                                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    cs = ClipScore(str(tmp_path / "clip"))
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a handwritten digit one", "a photo of a cat", "a handwritten digit seven"]
    score = cs(images, prompts)
    m = cs.model
    x = (images - cs.mean) / cs.std
    ids = tok(prompts, padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
        i = m.get_image_features(pixel_values=x)
        t = m.get_text_features(input_ids=ids.input_ids, attention_mask=ids.attention_mask)
    i, t = getattr(i, "pooler_output", i), getattr(t, "pooler_output", t)
    ref = (100 * torch.nn.functional.cosine_similarity(i, t).clamp(min=0)).mean().item()
    assert score == pytest.approx(ref, rel=1e-4, abs=1e-4)
    assert 0 <= score <= 100
