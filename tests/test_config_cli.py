"""Configuration and command-line behaviour: unknown keys, aliases, YAML, bad input, dry run."""

import pytest

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.config import ConfigError


def test_unknown_flag_is_rejected_with_suggestion(tiny_teacher, caption_folder, tmp_path, capsys):
    rc = main(["distill", *run_args(tiny_teacher, caption_folder, tmp_path), "--learning_rat", "1e-5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown option --learning_rat" in err and "--learning_rate" in err


def test_flag_of_another_method_is_named():
    import dataclasses

    from fewstep.config import TrainConfig, resolve
    from fewstep.methods.lcm import LCMConfig

    Other = dataclasses.make_dataclass("Other", [("generator_lr", float, 1e-5)])

    with pytest.raises(ConfigError, match="setting of --method dmd2"):
        resolve({"method": "lcm", "pretrained_teacher_model": "x", "generator_lr": 1}, {"lcm": LCMConfig, "dmd2": Other},
                TrainConfig)


def test_yaml_then_cli_override_and_aliases(tiny_teacher, caption_folder, tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text(f"pretrained_model_name_or_path: {tiny_teacher}\ntrain_data_dir: {caption_folder}\n"
                 "per_device_train_batch_size: 3\nlearning_rate: 2.0e-5\nrecompute: true\nloss_type: huber\n")
    spec = parse_run(["--config", str(y), "--learning_rate", "3e-5", "--center_crop", "--random_flip", "False",
                      "--validation_inference_steps", "1", "4"])
    t, m = spec.train, spec.method
    assert t.pretrained_teacher_model == str(tiny_teacher) and t.train_batch_size == 3
    assert t.learning_rate == 3e-5 and t.gradient_checkpointing is True
    assert t.center_crop is True and t.random_flip is False and t.validation_inference_steps == [1, 4]
    assert m.loss_type == "huber"
    spec = parse_run(["--config", str(y), "--lora_rank", "4", "--lora_target_modules", "to_q,to_k", "--validation_prompts",
                      "a cat, sitting|a dog"])
    assert spec.method.lora_target_modules == ["to_q", "to_k"]
    assert spec.train.validation_prompts == ["a cat, sitting", "a dog"]
    assert parse_run([f"--config={y}", "--learning_rate=4e-5"]).train.train_batch_size == 3  # --key=value form


@pytest.mark.parametrize("flag,value,needle", [
    ("--mixed_precision", "fp8", "--mixed_precision must be"),
    ("--loss_type", "l1", "--loss_type must be"),
    ("--train_batch_size", "two", "expects int"),
    ("--w_min", "9", "--w_min <= --w_max"),
    ("--lr_scheduler", "cosinus", "not one of"),
    ("--num_ddim_timesteps", "0", "num_ddim_timesteps"),
    ("--method", "lcn", "did you mean 'lcm'"),
    ("--lora_alpha", "8", "--lora_alpha configure LoRA adapters: add --lora_rank"),  # not silently unused
])
def test_bad_values_are_rejected_before_loading(flag, value, needle, tmp_path, capsys):
    rc = main(["distill", "--pretrained_teacher_model", str(tmp_path / "nowhere"), "--train_data_dir",
               str(tmp_path), "--w_max", "8", flag, value])
    assert rc == 2
    assert needle in capsys.readouterr().err


def test_teacher_that_is_not_a_diffusers_folder(tmp_path, caption_folder, capsys):
    (tmp_path / "weights.safetensors").write_bytes(b"not really")
    (tmp_path / "folder").mkdir()
    for teacher, needle in [(tmp_path / "weights.safetensors", "from_single_file"),
                            (tmp_path / "folder", "not a diffusers model folder"),
                            (tmp_path / "missing", "no such folder")]:
        rc = main(["distill", *run_args(teacher, caption_folder, tmp_path / "o")])
        assert rc == 2
        assert needle in capsys.readouterr().err


def test_empty_data_folder(tiny_teacher, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["distill", *run_args(tiny_teacher, tmp_path / "empty", tmp_path / "o")])
    assert rc == 2
    assert "holds no images" in capsys.readouterr().err


def test_dry_run_loads_configs_only_and_trains_nothing(tiny_teacher, caption_folder, tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["distill", *run_args(tiny_teacher, caption_folder, out), "--dry_run"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "dry run OK" in text and "prediction_type=epsilon" in text and "first sample (3, 32, 32)" in text
    assert "w_min: 5.0" in text  # the resolved config is printed
    assert not out.exists() or not any(out.iterdir())
    # 12 images, a batch of 16: no full batch, so no step would ever run
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, train_batch_size=16), "--dry_run"]) == 2
    assert "fewer than one batch" in capsys.readouterr().err


def test_command_line_entry_point_reports_errors(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "fewstep", "distill", "--bogus_flag", "1"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "unknown option --bogus_flag" in r.stderr
    r = subprocess.run([sys.executable, "-m", "fewstep", "distil"], capture_output=True, text=True)
    assert r.returncode == 2 and "did you mean 'distill'" in r.stderr
