"""The commands users bring from the reference tools run unchanged (issue 18, items 1-4).

Each command below is the reference's own text with only paths substituted (the teacher, the data, the
output folder). It runs with --dry_run, and with a few real steps on a tiny teacher; for the real run
only the budget is appended (steps, resolution, batch: the tiny models on a CPU), never a flag removed.
"""

from __future__ import annotations

import hashlib
import io
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.config import ConfigError

# diffusers examples/consistency_distillation (README_sdxl.md / the LCD command)
LCD = """--pretrained_teacher_model={teacher} --output_dir={out}
    --mixed_precision=fp16 --resolution=512
    --learning_rate=1e-6 --loss_type="huber" --ema_decay=0.95 --adam_weight_decay=0.0
    --max_train_steps=1000 --max_train_samples=4000000 --dataloader_num_workers=8
    --train_shards_path_or_url="pipe:curl -L -s file://{shards}/{{00000..00001}}.tar"
    --validation_steps=200 --checkpointing_steps=200 --checkpoints_total_limit=10
    --train_batch_size=12
    --gradient_checkpointing --enable_xformers_memory_efficient_attention
    --gradient_accumulation_steps=1 --use_8bit_adam --resume_from_checkpoint=latest
    --report_to=wandb --seed=453645634 --push_to_hub"""

# PaddleMIX ppdiffusers/examples/consistency_distillation/lcm_trainer/README.md (train_lcm.py, SD1.5)
PADDLEMIX = """--do_train --output_dir {out} --per_device_train_batch_size 12 --gradient_accumulation_steps 1
    --learning_rate 1e-4 --weight_decay 0.0 --max_steps 10000 --lr_scheduler_type "constant" --warmup_steps 0
    --image_logging_steps 100 --logging_steps 10 --resolution 512 --save_steps 2000 --save_total_limit 20
    --seed 23 --dataloader_num_workers 4 --pretrained_model_name_or_path {teacher} --file_list {file_list}
    --model_max_length 77 --max_grad_norm 1 --disable_tqdm True --overwrite_output_dir --recompute True
    --loss_type "huber" --lora_rank 64 --is_sdxl False --is_lora True"""

# DiffSynth-Studio examples/qwen_image/model_training/lora/Qwen-Image-Distill-LoRA.sh (its direct distillation)
DIFFSYNTH = """--dataset_base_path {data} --dataset_metadata_path {data}/metadata.csv --data_file_keys "image"
    --extra_inputs "seed,rand_device,num_inference_steps,cfg_scale" --height 1328 --width 1328 --dataset_repeat 50
    --model_id_with_origin_paths "{teacher}:transformer/diffusion_pytorch_model*.safetensors,{teacher}:text_encoder/model*.safetensors,{teacher}:vae/diffusion_pytorch_model.safetensors"
    --learning_rate 1e-4 --num_epochs 5 --remove_prefix_in_ckpt "pipe.dit." --output_path "{out}"
    --lora_base_model "dit"
    --lora_target_modules "to_q,to_k,to_v,add_q_proj,add_k_proj,add_v_proj,to_out.0,to_add_out,img_mlp.net.2,img_mod.1,txt_mlp.net.2,txt_mod.1"
    --lora_rank 32 --use_gradient_checkpointing --dataset_num_workers 8 --find_unused_parameters
    --task direct_distill"""


def argv_of(text: str, **paths) -> list[str]:
    return shlex.split(text.format(**paths))


def _png(seed: int, size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shards")
    for s in range(2):
        with tarfile.open(d / f"{s:05d}.tar", "w") as tar:
            for i in range(8):
                for ext, data in (("png", _png(100 * s + i)), ("txt", f"a photo of a cat {i}".encode())):
                    info = tarfile.TarInfo(f"k{s}{i:03d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return d


@pytest.fixture(scope="module")
def file_list(tmp_path_factory) -> Path:
    import base64
    import gzip

    d = tmp_path_factory.mktemp("filelist")
    lines = [f"a photo of a cat {i}\tx\t{base64.b64encode(_png(500 + i)).decode()}" for i in range(16)]
    with gzip.open(d / "part0.gz", "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    (d / "a.filelist").write_text("part0.gz\n")
    (d / "custom_dataset.filelist.list").write_text("a.filelist\n")
    return d / "custom_dataset.filelist.list"


@pytest.fixture(scope="module")
def teacher77(tmp_path_factory) -> Path:
    """The tiny SD teacher with CLIP's 77 text positions (PaddleMIX's --model_max_length 77)."""
    from fewstep.testing import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("t77") / "teacher", model_max_length=77)


@pytest.fixture(scope="module")
def direct_data(tiny_teacher, tmp_path_factory) -> Path:
    from fewstep.generate import generate

    out = tmp_path_factory.mktemp("diffsynth") / "data"
    generate(str(tiny_teacher), str(out), ["a photo of a cat", "a photo of a dog"], teacher_steps=3,
             teacher_guidance_scale=3.0, student_steps=2, student_guidance_scale=1.0, images_per_prompt=1, seed=0,
             batch_size=4, progress=False)
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "logs" not in p.parts}


# ---- 1. diffusers' LCD command ------------------------------------------------------------------

def test_diffusers_lcd_command_dry_run(tiny_teacher, shards, tmp_path, capsys):
    out = tmp_path / "lcd"
    rc = main(["distill", *argv_of(LCD, teacher=tiny_teacher, out=out, shards=shards), "--dry_run"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert "dry run OK" in text.out and f"upload the student to the hub repo {out.name}" in text.out
    cfg = yaml.safe_load(text.out.split("\n", 1)[1].split("\ndata:", 1)[0])
    assert cfg["push_to_hub"] is True and cfg["report_to"] == "wandb" and cfg["seed"] == 453645634
    assert cfg["train_shards_path_or_url"].startswith("pipe:curl -L -s file://")
    assert not out.exists()


def test_diffusers_lcd_command_trains_logs_offline_and_keeps_the_export_when_the_hub_is_unreachable(
        tiny_teacher, shards, tmp_path):
    pytest.importorskip("wandb", reason="--report_to=wandb needs wandb (in the dev extras: pip install -e '.[dev]')")
    from fewstep.hub import EXIT_PUSH_FAILED

    out = tmp_path / "lcd"
    # Nothing listens on port 9: the hub and the wandb server are unreachable, as on a machine without network.
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "WANDB_BASE_URL": "http://127.0.0.1:9",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    env.pop("WANDB_MODE", None)
    argv = argv_of(LCD, teacher=tiny_teacher, out=out, shards=shards)
    budget = ["--max_train_steps", "2", "--resolution", "32", "--train_batch_size", "2"]
    r = subprocess.run([sys.executable, "-m", "fewstep", "distill", *argv, *budget], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == EXIT_PUSH_FAILED, r.stderr[-3000:]
    assert "wandb: the server cannot be reached; logging offline" in r.stderr
    assert f"The student in {out} is complete and was not changed" in r.stderr
    assert f"fewstep push {out} --hub_model_id {out.name}" in r.stderr
    assert list((out / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))  # the wandb run, for `wandb sync`
    resolved = yaml.safe_load((out / "fewstep_config.yaml").read_text())
    # Ran on a CPU: 8-bit Adam and xformers are CUDA options; the recorded config says what ran.
    assert resolved["use_8bit_adam"] is False and resolved["enable_xformers_memory_efficient_attention"] is False
    assert resolved["hub_token"] is None and (out / "checkpoint-2").is_dir()
    # A later `fewstep push` (still no hub) fails the same way and leaves the export byte for byte as it was.
    before = _hashes(out)
    r = subprocess.run([sys.executable, "-m", "fewstep", "push", str(out), "--hub_model_id", "me/lcd",
                        "--hub_token", "hf_not_a_real_token"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == EXIT_PUSH_FAILED and "fewstep push" in r.stderr and "hf_not_a_real_token" not in r.stderr
    assert _hashes(out) == before
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.from_pretrained(out / "unet").config.time_cond_proj_dim == 256


def test_push_uploads_the_export_and_card_only(tiny_teacher, caption_folder, tmp_path):
    from fewstep.hub import export_files

    out = tmp_path / "o"
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, checkpointing_steps=1,
                                      validation_steps=2)]) == 0
    (out / "notes.txt").write_text("mine")
    files = export_files(out)
    assert {"model_index.json", "README.md", "fewstep_config.yaml", "fewstep_sampling.json",
            "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"} <= set(files)
    assert not [f for f in files if f.startswith(("checkpoint-", "logs", "validation")) or f == "notes.txt"]
    assert main(["push", str(tmp_path / "nothing")]) == 2


# ---- 2. PaddleMIX's LCM-LoRA command ------------------------------------------------------------

def test_paddlemix_command_dry_run_and_real_steps(teacher77, file_list, tmp_path, capsys, caplog):
    out = tmp_path / "lcm_lora_outputs"
    argv = argv_of(PADDLEMIX, out=out, teacher=teacher77, file_list=file_list)
    assert main(["distill", *argv, "--dry_run"]) == 0
    spec = parse_run(argv)
    t, m = spec.train, spec.method
    assert (t.train_batch_size, t.max_train_steps, t.lr_warmup_steps, t.validation_steps) == (12, 10000, 0, 100)
    assert (t.checkpointing_steps, t.checkpoints_total_limit, t.logging_steps) == (2000, 20, 10)
    assert t.gradient_checkpointing and t.disable_tqdm and t.overwrite_output_dir and t.do_train
    assert t.model_max_length == 77 and t.is_sdxl is False and m.is_lora and m.rank == 64
    capsys.readouterr()

    # A previous full-model run in the same folder: --overwrite_output_dir replaces it, leaving no mixed folder.
    out.mkdir()
    (out / "checkpoint-5000").mkdir()
    (out / "checkpoint-5000" / "fewstep_complete").write_text("5000")
    (out / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "x"]}')
    (out / "unet").mkdir()
    budget = ["--max_steps", "2", "--resolution", "32", "--per_device_train_batch_size", "2",
              "--dataloader_num_workers", "0"]
    caplog.set_level("INFO", logger="fewstep")
    assert main(["distill", *argv, *budget]) == 0
    # --disable_tqdm True: log lines (at --logging_steps 10, and the last step), no progress bar
    assert "step 2/2: loss" in caplog.text and "steps:" not in capsys.readouterr().err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "pytorch_lora_weights_kohya.safetensors").is_file()


def test_paddlemix_meanings_are_checked(tiny_teacher, teacher77, file_list, tmp_path, capsys):
    argv = argv_of(PADDLEMIX, out=tmp_path / "o", teacher=teacher77, file_list=file_list)
    for extra, needle in [(["--is_sdxl", "True"], "--is_sdxl True: "),
                          (["--do_train", "False"], "always trains"),
                          (["--pretrained_model_name_or_path", str(tiny_teacher)],
                           "--model_max_length 77: the teacher's text encoder reads at most 16 tokens")]:
        assert main(["distill", *argv, *extra, "--dry_run"]) == 2
        assert needle in capsys.readouterr().err


def test_model_max_length_truncates_prompts(teacher77, caption_folder, tmp_path):
    from fewstep.training.trainer import Trainer

    tr = Trainer(parse_run(run_args(teacher77, caption_folder, tmp_path / "o", model_max_length=8)))
    assert tr.bundle.tokenizer.model_max_length == 8
    assert tr.bundle.encode_text(["a photo of a cat"])["encoder_hidden_states"].shape[1] == 8  # (77 by default)


# ---- 3. DiffSynth-Studio's direct distillation command -----------------------------------------

def test_diffsynth_command_maps_onto_direct(tiny_teacher, direct_data, tmp_path, capsys):
    out = tmp_path / "Qwen-Image-Distill-LoRA_lora"
    argv = argv_of(DIFFSYNTH, data=direct_data, teacher=tiny_teacher, out=out)
    assert main(["distill", *argv, "--dry_run"]) == 0
    spec = parse_run(argv)
    t, m = spec.train, spec.method
    assert t.method == "direct" and t.pretrained_teacher_model == str(tiny_teacher) and t.resolution == 1328
    assert t.train_batch_size == 1 and t.image_column == "image" and t.gradient_checkpointing
    assert t.max_train_steps == 5 * 50 * 2  # epochs x repeats x rows, one sample per step, as DiffSynth trains
    assert m.lora_rank == 32 and t.find_unused_parameters and t.dataloader_num_workers == 8
    capsys.readouterr()
    budget = ["--height", "32", "--width", "32", "--num_epochs", "1", "--dataset_repeat", "1",
              "--dataset_num_workers", "0"]
    assert main(["distill", *argv, *budget]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "checkpoint-2").is_dir()
    assert yaml.safe_load((out / "fewstep_config.yaml").read_text())["max_train_steps"] == 2


def test_diffsynth_flags_without_meaning_are_refused_by_name_all_at_once(tiny_teacher, direct_data, tmp_path,
                                                                         capsys):
    argv = argv_of(DIFFSYNTH, data=direct_data, teacher=tiny_teacher, out=tmp_path / "o")
    i = argv.index("--height")
    argv[i:i + 4] = ["--max_pixels", "1048576"]  # the Distill-Full example's sizing
    argv += ["--model_id_with_origin_paths", f"other/model:transformer/x.safetensors,{tiny_teacher}:vae/x",
             "--use_gradient_checkpointing_offload", "--data_file_keys", "image,edit_image", "--task", "sft"]
    assert main(["distill", *argv, "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert "5 options cannot be used" in err
    for needle in ["--max_pixels: DiffSynth-Studio's --max_pixels", "use --resolution N",
                   "--model_id_with_origin_paths names 2 models", "--use_gradient_checkpointing_offload:",
                   "--data_file_keys image,edit_image", "--task sft: not a fewstep method", "direct_distill (--method direct)"]:
        assert needle in err


# ---- 4. diffusers / kohya habits and unknown flags ---------------------------------------------

def test_unknown_flags_are_all_reported_and_hub_flags_never_become_the_teacher(tmp_path, capsys):
    rc = main(["distill", "--pretrained_teacher_model", "x", "--train_data_dir", str(tmp_path), "--bogus", "1",
               "--bare_unknown", "--hub_modle_id", "me/x", "--learning_rat", "1e-5"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "4 options cannot be used" in err and "unknown option --bogus" in err
    assert "unknown option --bare_unknown" in err and "needs a value" not in err
    assert "unknown option --hub_modle_id; did you mean --hub_model_id?" in err and "--model_id?" not in err
    assert "did you mean --learning_rate?" in err
    with pytest.raises(ConfigError, match="--hub_model_id / --hub_token only apply with --push_to_hub"):
        parse_run(["--pretrained_teacher_model", "x", "--hub_model_id", "me/x"])


def test_cache_dir_given_a_hub_download_cache_is_explained(tmp_path):
    hf = tmp_path / "hf_cache"
    (hf / "models--runwayml--stable-diffusion-v1-5").mkdir(parents=True)
    for path in (hf, tmp_path / "missing"):
        with pytest.raises(ConfigError) as e:
            parse_run(["--pretrained_teacher_model", "x", "--cache_dir", str(path)])
        assert "`fewstep cache`" in str(e.value) and "HF_HOME or HF_HUB_CACHE" in str(e.value)
    assert "looks like a Hugging Face download cache" in str(
        pytest.raises(ConfigError, parse_run, ["--pretrained_teacher_model", "x", "--cache_dir", str(hf)]).value)


def test_epochs_and_singular_validation_prompt(tiny_teacher, caption_folder, tmp_path):
    args = run_args(tiny_teacher, caption_folder, tmp_path / "o", train_batch_size=4)
    j = args.index("--max_train_steps")
    del args[j:j + 2]
    spec = parse_run([*args, "--num_train_epochs", "3", "--validation_prompt", "a cat, sitting", "--validation_steps", "10"])
    assert spec.train.max_train_steps == 3 * (12 // 4) and spec.train.validation_prompts == ["a cat, sitting"]
    spec = parse_run([*args, "--num_train_epochs", "3", "--gradient_accumulation_steps", "2"])
    assert spec.train.max_train_steps == 5  # ceil(9 batches / 2)
    assert parse_run([*args, "--num_train_epochs", "3", "--max_train_steps", "7"]).train.max_train_steps == 7


def test_kohya_caption_sidecars(tiny_teacher, tmp_path, capsys):
    from fewstep.data import build_dataset

    d = tmp_path / "10_cats"
    d.mkdir()
    for i in range(4):
        (d / f"img{i}.png").write_bytes(_png(i))
        (d / f"img{i}.caption").write_text(f"a photo of a cat {i}")
    spec = parse_run(["--pretrained_teacher_model", "x", "--train_data_dir", str(tmp_path), "--resolution", "32"])
    assert [build_dataset(spec.train)[i]["caption"] for i in range(4)] == [f"a photo of a cat {i}" for i in range(4)]
    spec = parse_run(["--pretrained_teacher_model", "x", "--train_data_dir", str(tmp_path), "--resolution", "32",
                      "--caption_extension", "caption"])
    assert build_dataset(spec.train)[0]["caption"] == "a photo of a cat 0"
    # The wrong extension: nothing usable, refused before any model loads, naming the option
    rc = main(["distill", *run_args(tiny_teacher, tmp_path, tmp_path / "o", train_batch_size=2),
               "--caption_extension", ".txt"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no usable sample" in err and "4 missing caption" in err and "--caption_extension" in err
    assert not (tmp_path / "o").exists()
