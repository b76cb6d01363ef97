"""Traps that lost work (issue 18, items 5-9): another run's output folder, students sampled at step counts
they cannot run, evaluations interrupted half way, a dry run that disagreed with the run, inputs that were
silently rounded or refused too late."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_args
from fewstep.cli import main

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _png(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _mtimes(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ---- 5. a new run into another run's folder ------------------------------------------------------

def test_a_new_run_into_another_runs_folder_is_refused_unless_asked(tiny_teacher, caption_folder, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, checkpointing_steps=1,
                                      checkpoints_total_limit=1)]) == 0
    before = _mtimes(out)
    capsys.readouterr()
    new = run_args(tiny_teacher, caption_folder, out, max_train_steps=3, learning_rate=1e-3, checkpointing_steps=1,
                   checkpoints_total_limit=1)
    for extra in ([], ["--dry_run"]):  # the dry run refuses it too
        assert main(["distill", *new, *extra]) == 2
        err = capsys.readouterr().err
        assert f"--output_dir {out} holds another run (checkpoint-2, an exported student" in err
        assert "--resume_from_checkpoint latest" in err and "--overwrite_output_dir" in err
    assert _mtimes(out) == before  # nothing written, nothing deleted

    # --overwrite_output_dir: the old run's checkpoints go; rotation keeps this run's newest
    assert main(["distill", *new, "--overwrite_output_dir"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    import yaml

    assert yaml.safe_load((out / "fewstep_config.yaml").read_text())["learning_rate"] == 1e-3
    # --resume_from_checkpoint continues the run that is there (same run id: its checkpoints rotate)
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=4, learning_rate=1e-3,
                                      checkpointing_steps=1, checkpoints_total_limit=1),
                 "--resume_from_checkpoint", "latest"]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert main(["distill", *new, "--overwrite_output_dir", "--resume_from_checkpoint", "latest"]) == 2


def test_rotation_removes_only_the_current_runs_checkpoints(tmp_path):
    from fewstep.training import checkpoint as ck

    class FileAccelerator:  # what save_checkpoint needs from accelerate
        is_main_process = True

        def wait_for_everyone(self):
            pass

        def save_state(self, path):
            Path(path).mkdir(parents=True, exist_ok=True)
            (Path(path) / "model.safetensors").write_bytes(b"x")

    acc = FileAccelerator()
    for step in (100, 200):  # another run, with higher step numbers
        ck.save_checkpoint(acc, tmp_path, step, None, run={"run_id": "other-run"})
    for step in (1, 2, 3):
        ck.save_checkpoint(acc, tmp_path, step, 2, run={"run_id": "this-run", "train_seconds": float(step)})
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3, 100, 200]
    assert ck.run_info(tmp_path / "checkpoint-3") == {"run_id": "this-run", "train_seconds": 3.0}


# ---- 6. a student asked for step counts it cannot run; an interrupted evaluation ---------------

@pytest.fixture(scope="module")
def one_step_dmd2(tiny_teacher, caption_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dmd2") / "student"
    args = run_args(tiny_teacher, caption_folder, out, method="dmd2", dfake_gen_update_ratio=1, max_train_steps=2,
                    learning_rate=1e-4, real_guidance_scale=2.0, conditioning_timestep=399)
    assert main(["distill", *args]) == 0
    return out


def test_one_step_student_at_more_steps_is_refused_before_generating(tiny_teacher, one_step_dmd2, tmp_path,
                                                                     monkeypatch, capsys):
    import diffusers

    def no_weights(*a, **k):
        raise AssertionError("a model was loaded before the steps were checked")

    out = tmp_path / "eval"
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained", no_weights)
    assert main(["eval", "--model", f"teacher={tiny_teacher}", "--model", f"dmd2={one_step_dmd2}",
                 "--steps", "1", "2", "4", "--teacher_steps", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 planned run(s) cannot be sampled" in err and f"--model dmd2={one_step_dmd2} (lcm)" in err
    assert "cannot sample 2 step(s)" in err and "cannot sample 4 step(s)" in err and "trained for 1 step(s)" in err
    assert not out.exists()
    assert main(["sample", "--model", str(one_step_dmd2), "--prompt", "x", "--num_inference_steps", "2",
                 "--output", str(tmp_path / "x.png")]) == 2
    assert "LCMScheduler cannot sample 2 step(s)" in capsys.readouterr().err


def test_an_interrupted_evaluation_keeps_the_rows_it_finished(tiny_teacher, tmp_path):
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "fewstep", "eval", "--model", f"t={tiny_teacher}", "--steps", "1", "2",
           "--teacher_steps", "2", "500", "--baselines", "ddim", "--num_images", "40", "--batch_size", "40",
           "--features", "random", "--out", str(out)]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 240
    results = out / "results.json"
    while time.time() < deadline and not results.is_file():
        time.sleep(0.2)
    assert results.is_file(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)  # during the 500-step row
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    data = json.loads(results.read_text())
    assert data["meta"]["complete"] is False and data["meta"]["runs_planned"] == 4
    assert [(r["scheduler"], r["steps"]) for r in data["results"]] == [("ddim", 2)]
    assert data["results"][0]["frechet_distance"] > 0 and "1 of 4 runs" in (out / "report.md").read_text()


def test_teacher_reference_distance(tiny_teacher, tmp_path):
    from fewstep.eval.metrics import RandomConvFeatures, frechet_distance_between
    from fewstep.eval.run import EvalRun, generate, make_prompts
    from fewstep.eval.teacher import fd_to_teacher, teacher_images

    n = 12
    prompts, seeds = make_prompts(n, None), list(range(n))
    ex = RandomConvFeatures()
    ref = teacher_images(str(tiny_teacher), prompts, seeds, steps=6, guidance_scale=2.0, batch_size=6,
                         cache_dir=tmp_path / "cache")
    again = teacher_images(str(tiny_teacher), prompts, seeds, steps=6, guidance_scale=2.0, batch_size=6,
                           cache_dir=tmp_path / "cache")
    assert torch.equal(ref, again) and len(list((tmp_path / "cache").glob("*.pt"))) == 1
    few, _ = generate(EvalRun("t", str(tiny_teacher), "ddim", 1, 2.0), prompts, seeds, None, 6, "cpu", {})
    d = fd_to_teacher(few, ref, ex)
    assert d == pytest.approx(frechet_distance_between(ex, few, ref))
    assert fd_to_teacher(ref, ref, ex) < d / 100  # (a random tiny teacher: its images differ little)
    with pytest.raises(ValueError, match="same prompts and seeds"):
        fd_to_teacher(few[:5], ref, ex)
    # `fewstep eval --teacher_reference`: the same number in the report, 0 for the reference row itself
    refdir = tmp_path / "reference"
    refdir.mkdir()
    for i in range(2):
        Image.fromarray((ref[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(refdir / f"{i}.png")
    out = tmp_path / "eval"
    assert main(["eval", "--model", f"t={tiny_teacher}", "--steps", "1", "--teacher_steps", "6", "--baselines",
                 "--guidance_scale", "2", "--num_images", str(n), "--batch_size", "6", "--features", "random",
                 "--reference", str(refdir), "--teacher_reference", "t", "--teacher_reference_steps", "6",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]
    assert rows[0]["steps"] == 6 and rows[0]["fd_teacher"] < 1e-6
    assert "FD to teacher" in (out / "report.md").read_text()


# ---- 8. the dry run refuses exactly what the run refuses ----------------------------------------

def test_dry_run_skips_a_corrupt_first_sample_as_the_run_does(tiny_teacher, tmp_path, capsys):
    from fewstep.training.trainer import EpochSampler

    d = tmp_path / "data"
    d.mkdir()
    for i in range(8):
        (d / f"{i}.png").write_bytes(_png(i))
        (d / f"{i}.txt").write_text("a photo of a cat")
    first = next(iter(EpochSampler(8, 0)))  # the sample the run's first epoch reads first
    (d / f"{first}.png").write_bytes(b"not an image")
    args = run_args(tiny_teacher, d, tmp_path / "o", train_batch_size=2)
    assert main(["distill", *args, "--dry_run"]) == 0
    assert "1 bad of the first 8 read, which the run skips: 1 corrupt image" in capsys.readouterr().out
    assert main(["distill", *args]) == 0


def test_dry_run_refuses_a_resume_with_another_method(tiny_teacher, caption_folder, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, checkpointing_steps=1)]) == 0
    capsys.readouterr()
    args = run_args(tiny_teacher, caption_folder, out, method="dmd2", max_train_steps=4)
    for extra in (["--dry_run"], []):
        assert main(["distill", *args, "--resume_from_checkpoint", "latest", *extra]) == 2
        assert "--method 'lcm' there, 'dmd2' now" in capsys.readouterr().err


# ---- 9. inputs refused before anything loads -----------------------------------------------------

def test_sample_refuses_a_resolution_it_would_round(tiny_teacher, tmp_path, monkeypatch, capsys):
    import diffusers

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights loaded")))
    assert main(["sample", "--model", str(tiny_teacher), "--prompt", "x", "--resolution", "62",
                 "--output", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--resolution 62 is not a multiple of 4" in err and "use 60 or 64" in err  # (the tiny VAE: 4 px per latent)
    monkeypatch.undo()
    png = tmp_path / "y.png"
    assert main(["sample", "--model", str(tiny_teacher), "--prompt", "x", "--resolution", "60",
                 "--num_inference_steps", "1", "--output", str(png)]) == 0
    assert Image.open(png).size == (60, 60)


def test_a_folder_of_non_images_exits_2_before_loading_and_writes_nothing(tiny_teacher, tmp_path, monkeypatch,
                                                                          capsys):
    import diffusers

    d = tmp_path / "not_images"
    d.mkdir()
    for i in range(70):
        (d / f"{i:03d}.png").write_text("these are not images")
        (d / f"{i:03d}.txt").write_text("a photo of a cat")
    monkeypatch.setattr(diffusers.UNet2DConditionModel, "from_pretrained",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("weights loaded")))
    out = tmp_path / "o"
    assert main(["distill", *run_args(tiny_teacher, d, out, train_batch_size=2)]) == 2
    err = capsys.readouterr().err
    assert "64 of the first 64 samples are unusable" in err and "64 corrupt image" in err
    assert not out.exists()  # no logs/, no config
