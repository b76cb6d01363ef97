"""Presets (configs/<method>/<family>.yaml) and `fewstep compare` (issue 18, items 10-11)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from fewstep.cli import main, parse_run
from fewstep.config import ConfigError
from fewstep.runspec import list_presets


@pytest.fixture(scope="module")
def teachers(tiny_teacher, tiny_sdxl, tmp_path_factory) -> dict[str, Path]:
    """The tiny teacher of each family, keyed by ``bundle.family`` (what a preset's ``family`` names)."""
    from fewstep.testing import build_tiny_sd3

    return {"sd": tiny_teacher, "sdxl": tiny_sdxl, "sd3": build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "t")}


@pytest.fixture(scope="module")
def data32(tmp_path_factory) -> Path:
    from fewstep.testing import write_caption_folder

    return write_caption_folder(tmp_path_factory.mktemp("data32") / "images", n=32, size=40)


def test_every_preset_dry_runs_on_the_tiny_teacher_of_its_family(teachers, data32, tmp_path, capsys):
    from fewstep.generate import generate
    from fewstep.models.bundle import load_bundle

    presets = list_presets()
    names = {p.name for p in presets}
    assert {"lcm/sd15", "lcm/sd15-lora", "lcm/sdxl", "lcm/sdxl-lora", "dmd2/sd15", "dmd2/sdxl", "disback/sdxl",
            "direct/sd15"} <= names
    for p in presets:
        assert p.source and p.description and p.family in teachers, p.name
        teacher = teachers[p.family]
        assert load_bundle(str(teacher), weights=False).family == p.family
        data = data32
        if p.keys["method"] == "direct":  # teacher data, as `fewstep generate` writes it
            data = tmp_path / f"gen-{p.family}"
            generate(str(teacher), str(data), ["a photo of a cat"], teacher_steps=2, student_steps=2,
                     images_per_prompt=2, batch_size=2, progress=False)
        rc = main(["distill", "--preset", p.name, "--pretrained_teacher_model", str(teacher),
                   "--train_data_dir", str(data), "--output_dir", str(tmp_path / p.name.replace("/", "-")),
                   "--dry_run"])
        out = capsys.readouterr()
        assert rc == 0, (p.name, out.err[-2000:])
        resolved = yaml.safe_load(out.out.split("\n", 1)[1].split("\ndata:", 1)[0])
        cpu_only = () if torch.cuda.is_available() else ("use_8bit_adam",)  # (CUDA-only: off on a CPU, with a warning)
        for k, v in p.keys.items():  # every key of the preset reached the run
            assert resolved[k] == v or k in cpu_only, (p.name, k, resolved[k], v)
        assert resolved["preset"] == p.name


def test_presets_command_and_overrides(tiny_teacher, tiny_sdxl, data32, tmp_path, capsys):
    assert main(["presets"]) == 0
    text = capsys.readouterr().out
    assert "lcm/sd15 " in text and "source: diffusers examples/consistency_distillation" in text
    assert "dmd2/sdxl " in text and "tianweiy/DMD2" in text
    spec = parse_run(["--preset", "lcm/sd15", "--pretrained_teacher_model", str(tiny_teacher),
                      "--learning_rate", "3e-5"])
    assert spec.train.learning_rate == 3e-5 and spec.train.seed == 453645634 and spec.method.w_min == 5.0
    with pytest.raises(ConfigError, match="did you mean lcm/sd15"):
        parse_run(["--preset", "lcm/sd1", "--pretrained_teacher_model", "x"])
    rc = main(["distill", "--preset", "lcm/sdxl", "--pretrained_teacher_model", str(tiny_teacher),
               "--train_data_dir", str(data32), "--output_dir", str(tmp_path / "o"), "--dry_run"])
    assert rc == 2
    assert "--preset lcm/sdxl holds the settings for sdxl teachers" in capsys.readouterr().err


def _compare_spec(path: Path, teacher, data) -> Path:
    path.write_text(yaml.safe_dump({
        "distill": {"pretrained_teacher_model": str(teacher), "train_data_dir": str(data), "resolution": 32,
                    "max_train_steps": 2, "train_batch_size": 2, "learning_rate": 1e-4, "lr_warmup_steps": 0},
        "runs": {"lcd": {"method": "lcm"}, "lora": {"method": "lcm", "lora_rank": 4}},
        "eval": {"steps": [1], "teacher_reference_steps": 4, "num_images": 8, "features": "random",
                 "reference": str(data), "eval_points": 2, "wallclock_steps": 1, "batch_size": 8}}))
    return path


def test_compare_one_report_quality_vs_steps_and_wall_clock(tiny_teacher, caption_folder, tmp_path):
    spec = _compare_spec(tmp_path / "compare.yaml", tiny_teacher, caption_folder)
    out = tmp_path / "report"
    assert main(["compare", "--spec", str(spec), "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    rows = {(r["label"], r["scheduler"], r["steps"]): r for r in data["quality_vs_steps"]}
    assert set(rows) == {("teacher", "ddim", 4), ("teacher", "dpm++", 1), ("teacher", "euler", 1),
                         ("lcd", "lcm", 1), ("lora", "lcm", 1)}
    assert rows[("teacher", "ddim", 4)]["fd_teacher"] < 1e-6  # the reference against itself
    assert all(r["fd_teacher"] > 0 and r["frechet_distance"] > 0 for k, r in rows.items() if k[2] != 4)
    for label in ("lcd", "lora"):
        pts = sorted((t["train_step"], t["seconds"]) for t in data["quality_vs_time"] if t["label"] == label)
        assert [p[0] for p in pts] == [1, 2] and 0 < pts[0][1] <= pts[1][1]
        assert (out / "work" / label / "at-1" / "fewstep_sampling.json").is_file()  # the step-1 student
    for f in ("compare.md", "quality_vs_steps.png", "quality_vs_time.png", "steps/results.json"):
        assert (out / f).is_file(), f
    text = (out / "compare.md").read_text()
    assert "| lcd | lcm |" in text and "| teacher | dpm++ |" in text and "training loop" in text


@pytest.mark.slow
def test_compare_rerun_continues_without_training_again(tiny_teacher, caption_folder, tmp_path):
    spec = _compare_spec(tmp_path / "compare.yaml", tiny_teacher, caption_folder)
    out = tmp_path / "report"
    assert main(["compare", "--spec", str(spec), "--out", str(out), "--runs", "lcd"]) == 0
    ckpt = out / "work" / "lcd" / "checkpoint-2"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}
    assert main(["compare", "--spec", str(spec), "--out", str(out), "--runs", "lcd"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before
    assert len(json.loads((out / "compare.json").read_text())["quality_vs_time"]) == 2


def test_compare_refuses_unequal_budgets_before_training(tiny_teacher, caption_folder, tmp_path, capsys):
    spec = tmp_path / "c.yaml"
    spec.write_text(yaml.safe_dump({"distill": {"pretrained_teacher_model": str(tiny_teacher),
                                                "train_data_dir": str(caption_folder), "max_train_steps": 4,
                                                "train_batch_size": 2},
                                    "runs": {"a": {"method": "lcm", "max_train_steps": 8}}}))
    assert main(["compare", "--spec", str(spec), "--out", str(tmp_path / "r")]) == 2
    assert "runs.a: max_train_steps set per run; the budget is shared" in capsys.readouterr().err
    spec.write_text(yaml.safe_dump({"distill": {"pretrained_teacher_model": str(tiny_teacher),
                                                "train_data_dir": str(caption_folder), "max_train_steps": 4,
                                                "train_batch_size": 2, "resolution": 32},
                                    "runs": {"a": {"method": "lcm"}, "b": {"method": "lcm", "lerning_rate": 1}}}))
    assert main(["compare", "--spec", str(spec), "--out", str(tmp_path / "r")]) == 2
    assert "unknown option --lerning_rate" in capsys.readouterr().err
    assert not (tmp_path / "r" / "work" / "a" / "checkpoint-2").exists()  # run a did not train first
