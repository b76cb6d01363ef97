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
    from fewstep.methods.lcm import LCM

    Other = type("Other", (), {"Config": dataclasses.make_dataclass("OtherConfig", [("generator_lr", float, 1e-5)])})

    with pytest.raises(ConfigError, match="setting of --method dmd2"):
        resolve({"method": "lcm", "pretrained_teacher_model": "x", "generator_lr": 1}, {"lcm": LCM, "dmd2": Other},
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


# ---- bad input found by the user audit: each exits 2 with a line naming the fix ------------------

def test_unknown_scheduler_is_named_before_any_work(tiny_teacher, tmp_path, capsys):
    import json

    from fewstep.diffusion.sampling import SCHEDULERS, make_scheduler

    cfg = json.loads((tiny_teacher / "scheduler" / "scheduler_config.json").read_text())
    assert [type(make_scheduler(k, cfg)).__name__ for k in SCHEDULERS[:-1]] == [
        "LCMScheduler", "DDIMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler",
        "DDPMScheduler"]
    with pytest.raises(ConfigError, match="'flow-euler' samples flow-matching teachers"):
        make_scheduler("flow-euler", cfg)  # a flow sampler on a DDPM table would sample nonsense
    with pytest.raises(ConfigError, match="choose from lcm, ddim"):
        make_scheduler("foo", cfg)
    # sample: refused before the model folder is even read
    assert main(["sample", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--scheduler", "dpm+"]) == 2
    assert "--scheduler 'dpm+': unknown scheduler (did you mean 'dpm++'?)" in capsys.readouterr().err
    out = tmp_path / "eval"
    assert main(["eval", "--model", f"t={tiny_teacher}", "--baselines", "ddim", "foo", "--out", str(out)]) == 2
    assert "--baselines 'foo': unknown scheduler" in capsys.readouterr().err
    assert not out.exists()  # no image was generated


def test_resume_under_other_trainable_settings_is_refused(tiny_teacher, caption_folder, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, checkpointing_steps=1)]) == 0
    lora = ["--lora_rank", "4", "--resume_from_checkpoint", "latest", "--max_train_steps", "4"]
    capsys.readouterr()
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out), *lora]) == 2
    err = capsys.readouterr().err
    assert f"--resume_from_checkpoint {out / 'checkpoint-2'}: that run was trained with other settings" in err
    assert "--lora_rank None there, 4 now" in err and "another --output_dir" in err
    # The checkpoint records its own settings: the run's fewstep_config.yaml is not needed
    (out / "fewstep_config.yaml").rename(tmp_path / "config.yaml")
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out), *lora]) == 2
    assert "--lora_rank None there, 4 now" in capsys.readouterr().err
    # Without any recorded settings the failed load itself is named, not a traceback of missing keys
    import json

    from fewstep.training import checkpoint as ck

    for c in out.glob("checkpoint-*"):
        state = json.loads((c / ck.STATE_JSON).read_text())
        state["config"] = None
        (c / ck.STATE_JSON).write_text(json.dumps(state))
        ck.write_manifest(c, int(c.name.split("-")[1]))  # a consistent checkpoint, only without the record
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out), *lora]) == 2
    err = capsys.readouterr().err
    assert "this run's models or optimizers cannot load it (Error(s) in loading state_dict" in err
    assert "another --output_dir" in err and "Traceback" not in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]  # nothing written


def test_lora_targets_that_match_nothing_name_the_layers(tiny_teacher, caption_folder, tmp_path, capsys):
    rc = main(["distill", *run_args(tiny_teacher, caption_folder, tmp_path / "o", lora_rank=4,
                                    lora_target_modules="to_qq,to_kk")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--lora_target_modules to_qq,to_kk: no module of the UNet2DConditionModel has such a name" in err
    names = err.split("are named ")[1].strip().split(", ")
    assert {"to_q", "to_k", "to_v", "to_out.0", "conv1", "time_emb_proj"} <= set(names)
    assert "0" not in names and len(names) == len(set(names))


def test_sample_creates_the_output_folder(tiny_teacher, tmp_path):
    from PIL import Image

    png = tmp_path / "new" / "dir" / "x.png"
    assert main(["sample", "--model", str(tiny_teacher), "--prompt", "x", "--num_inference_steps", "1",
                 "--output", str(png)]) == 0
    assert Image.open(png).format == "PNG"


def test_eval_prompts_and_num_images_are_checked(tiny_teacher, tmp_path, capsys):
    base = ["eval", "--model", f"t={tiny_teacher}", "--out", str(tmp_path / "e")]
    assert main([*base, "--prompts", str(tmp_path / "missing.txt")]) == 2
    assert f"--prompts {tmp_path / 'missing.txt'}: no such file" in capsys.readouterr().err
    (tmp_path / "blank.txt").write_text("\n  \n")
    assert main([*base, "--prompts", str(tmp_path / "blank.txt"), "--steps", "1", "--teacher_steps", "1",
                 "--baselines"]) == 2
    assert "holds no prompt" in capsys.readouterr().err
    assert main([*base, "--num_images", "0"]) == 2
    assert "--num_images and --batch_size must be >= 1" in capsys.readouterr().err


def test_batch_larger_than_the_data_set_is_named(tiny_teacher, caption_folder, tmp_path, capsys):
    rc = main(["distill", *run_args(tiny_teacher, caption_folder, tmp_path / "o", train_batch_size=16)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "the data set holds 12 samples, fewer than one batch of --train_batch_size 16 per process x 1" in err
    assert "lower --train_batch_size to at most 12 or add data" in err and "no usable sample" not in err
