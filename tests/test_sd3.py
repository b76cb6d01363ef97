"""The SD3 flow-matching family: tiny teacher, teacher data, direct distillation, vanilla reload."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.training.trainer import Trainer

PROMPTS = ["a handwritten digit five", "a photo of a dog"]
NO_T5 = dict(text_encoder_3=None, tokenizer_3=None)  # how vanilla diffusers loads an SD3 folder without T5


@pytest.fixture(scope="module")
def sd3_teacher(tmp_path_factory) -> Path:
    from fewstep.testing import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "teacher")


@pytest.fixture(scope="module")
def sd3_data(sd3_teacher, tmp_path_factory) -> Path:
    from fewstep.generate import generate

    out = tmp_path_factory.mktemp("sd3data") / "data"
    generate(str(sd3_teacher), str(out), PROMPTS, teacher_steps=6, teacher_guidance_scale=3.0, student_steps=2,
             images_per_prompt=2, seed=3, save_latents=True, progress=False)
    return out


def args(teacher, data, out, **kw):
    return run_args(teacher, data, out, **{"method": "direct", "learning_rate": 1e-3, **kw})


def test_teacher_data_matches_vanilla_sd3_pipeline(sd3_teacher, sd3_data):
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from fewstep.models.bundle import load_bundle
    from fewstep.models.sd3 import SD3Bundle

    assert isinstance(load_bundle(str(sd3_teacher), weights=False), SD3Bundle)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_teacher, **NO_T5)
    lat = pipe(PROMPTS[1], num_inference_steps=6, guidance_scale=3.0, height=32, width=32, output_type="latent",
               generator=torch.Generator("cpu").manual_seed(5)).images
    saved = load_file(str(sd3_data / "latents" / "0000002.safetensors"))["latents"]  # row 2: prompt 1, seed 5
    assert (lat[0] - saved).abs().max() < 1e-5 and saved.std() > 0


# Recorded on CPU (torch 2.13, diffusers 0.42): first-step direct loss on the module's data, seed 0.
RECORDED_LOSS = 0.009890797547996044


def test_first_step_loss_is_recorded(sd3_teacher, sd3_data, tmp_path):
    tr = Trainer(parse_run(args(sd3_teacher, sd3_data, tmp_path / "o", max_train_steps=1)))
    tr.start()
    logs = tr.step()
    assert logs["loss"] == pytest.approx(RECORDED_LOSS, rel=1e-4)
    assert logs["grad_norm"] > 0


def test_train_export_reload_in_vanilla_sd3_pipeline(sd3_teacher, sd3_data, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from fewstep.diffusion.sampling import sample_images
    from fewstep.models.bundle import load_bundle

    out = tmp_path / "run"
    assert main(["distill"] + args(sd3_teacher, sd3_data, out, max_train_steps=2, direct_variant="trajectory")) == 0
    assert json.loads((out / "fewstep_sampling.json").read_text()) == {
        "num_inference_steps": 2, "valid_steps": [2, 2], "guidance_scale": 1.0, "sampler": "flow-euler"}
    assert (out / "transformer" / "config.json").is_file() and not (out / "unet").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(out, **NO_T5)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    ref = pipe(PROMPTS[0], num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(3)).images[0]
    bundle = load_bundle(str(out))
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    ours = sample_images(bundle, bundle.denoiser, sched, [PROMPTS[0]], [3], 2, 1.0, 32, 32)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() < 1e-5 and ref.std() > 0
    # The trained transformer differs from the teacher's: the export is the student.
    teacher = load_bundle(str(sd3_teacher)).denoiser.state_dict()
    assert any(not torch.equal(v, teacher[k]) for k, v in bundle.denoiser.state_dict().items())


def test_dry_run_reads_sd3_configs(sd3_teacher, sd3_data, tmp_path, capsys):
    assert main(["distill"] + args(sd3_teacher, sd3_data, tmp_path / "o", dry_run=True)) == 0
    out = capsys.readouterr().out
    assert ("family sd3, StableDiffusion3Pipeline, transformer in_channels=4, prediction_type=flow, flow matching, "
            "shift 3 [FlowMatchEulerDiscreteScheduler], default resolution 32 px") in out
    # every method runs on flow-matching teachers now: the dry run accepts each
    for method, kw in (("dmd2", {}), ("lcm", {}), ("lcm", {"lora_rank": 4}), ("disback", {"degradation_steps": 1}),
                       ("direct", {"lora_rank": 4})):
        assert main(["distill"] + args(sd3_teacher, sd3_data, tmp_path / method, method=method, dry_run=True,
                                       **kw)) == 0, capsys.readouterr().err
        assert "dry run OK" in capsys.readouterr().out
    # and refuses what the run refuses, before any weight loads (DisBack's default 200 degradation steps
    # leave none of 2 steps to backtrack: the dry run's memory plan builds the method, which says so)
    assert main(["distill"] + args(sd3_teacher, sd3_data, tmp_path / "d", method="disback", dry_run=True)) == 2
    assert "leaves no backtracking steps" in capsys.readouterr().err
    assert main(["distill"] + args(sd3_teacher, sd3_data, tmp_path / "k", method="dmd2", num_denoising_step=3,
                                   dry_run=True)) == 2
    assert "--num_denoising_step 3 must divide" in capsys.readouterr().err
