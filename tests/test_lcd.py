"""Latent consistency distillation end to end on tiny random teachers: loss, resume, export, reload."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.training.trainer import Trainer


def make_trainer(teacher, data, out, **kw) -> Trainer:
    return Trainer(parse_run(run_args(teacher, data, out, **kw)))


# Recorded on CPU (torch 2.13, diffusers 0.42): first-step LCD loss of the tiny teachers, seed 0.
# (Re-recorded when encode_images began returning contiguous latents: torch.randn_like draws other
# numbers for the channels-last tensors the CPU VAE returns.)
RECORDED = {"epsilon": {"l2": 0.0054587721824646, "huber": 0.0579228401184082},
            "v_prediction": {"l2": 0.0017823692178353667, "huber": 0.03293466195464134}}


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_first_step_loss_is_recorded(pred, loss_type, tiny_teacher, tiny_teacher_v, caption_folder, tmp_path):
    teacher = tiny_teacher if pred == "epsilon" else tiny_teacher_v
    tr = make_trainer(teacher, caption_folder, tmp_path / "o", loss_type=loss_type, max_train_steps=1)
    tr.start()
    logs = tr.step()
    assert logs["loss"] == pytest.approx(RECORDED[pred][loss_type], rel=1e-4)
    assert logs["grad_norm"] > 0


def _x0(pred, out, z, ac):
    if pred == "epsilon":
        return (z - (1 - ac).sqrt() * out) / ac.sqrt()
    return ac.sqrt() * z - (1 - ac).sqrt() * out


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_loss_equals_reference_built_from_diffusers(pred, tiny_teacher, tiny_teacher_v, caption_folder, tmp_path):
    """Algorithm 1 recomputed independently with diffusers' DDIMScheduler and LCMScheduler."""
    from diffusers import DDIMScheduler, LCMScheduler

    teacher = tiny_teacher if pred == "epsilon" else tiny_teacher_v
    tr = make_trainer(teacher, caption_folder, tmp_path / "o", w_min=3.0, w_max=9.0)
    tr.start()
    batch = tr._next_batch()
    m, b = tr.method, tr.bundle
    torch.manual_seed(123)
    loss = m.loss("student", batch, 0).loss.item()

    torch.manual_seed(123)  # replay the same random draws in the same order
    x0 = b.encode_images(batch["pixel_values"])
    B = x0.shape[0]
    n = torch.randint(0, 50, (B,))
    eps = torch.randn_like(x0)
    w = 3.0 + 6.0 * torch.rand(B)
    ddim = DDIMScheduler.from_config(b.scheduler_config)
    lcm = LCMScheduler.from_config(b.scheduler_config, timestep_scaling=10.0)
    cond = b.encode_text(batch["caption"])["encoder_hidden_states"]
    unc = b.encode_text([""] * B)["encoder_hidden_states"]
    from fewstep.diffusion.guidance import guidance_scale_embedding

    ref = 0.0
    with torch.no_grad():
        for i in range(B):
            s = 20 * int(n[i]) + 19
            t = max(s - 20, 0)
            z_s = ddim.add_noise(x0[i:i + 1], eps[i:i + 1], torch.tensor([s]))
            emb = guidance_scale_embedding(w[i:i + 1], 256)
            out = m.student(z_s, s, encoder_hidden_states=cond[i:i + 1], timestep_cond=emb).sample
            ac = ddim.alphas_cumprod[s]
            x0_s = _x0(pred, out, z_s, ac)
            cs, co = lcm.get_scalings_for_boundary_condition_discrete(s)
            f = cs * z_s + co * x0_s
            o_c = b.denoiser(z_s, s, encoder_hidden_states=cond[i:i + 1]).sample
            o_u = b.denoiser(z_s, s, encoder_hidden_states=unc[i:i + 1]).sample
            if pred == "v_prediction":  # to ε: the guided DDIM step is linear in the output
                o_c, o_u = (ac.sqrt() * o + (1 - ac).sqrt() * z_s for o in (o_c, o_u))
            guided = o_c + w[i] * (o_c - o_u)  # CFG at scale 1 + w
            ac_t = ddim.alphas_cumprod[t]  # the previous grid point; ᾱ_0 when s − k < 0
            x0_hat = (z_s - (1 - ac).sqrt() * guided) / ac.sqrt()
            z_t = ac_t.sqrt() * x0_hat + (1 - ac_t).sqrt() * guided  # DDIM (η = 0)
            out_t = m.target(z_t, t, encoder_hidden_states=cond[i:i + 1], timestep_cond=emb).sample
            ac_tt = ddim.alphas_cumprod[t]
            x0_t = _x0(pred, out_t, z_t, ac_tt)
            ct_s, ct_o = lcm.get_scalings_for_boundary_condition_discrete(t)
            y = ct_s * z_t + ct_o * x0_t
            ref += torch.mean((f - y) ** 2).item() / B
    assert loss == pytest.approx(ref, rel=1e-3)


def _weights(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))


def test_sigterm_then_resume_is_exact(tiny_teacher, caption_folder, tmp_path, monkeypatch):
    """4 steps straight == SIGTERM during step 2 (checkpoint at the step boundary, clean exit) + resume
    with the same command: same student, same EMA target, same optimizer and lr schedule."""
    import os
    import signal

    from safetensors.torch import load_file

    from fewstep.methods.lcm import LCM
    from fewstep.training.checkpoint import read_state_file

    common = dict(max_train_steps=4, checkpointing_steps=4, train_batch_size=4, lr_warmup_steps=2,
                  lr_scheduler="linear")
    assert main(["distill"] + run_args(tiny_teacher, caption_folder, tmp_path / "a", **common)) == 0

    real_loss = LCM.loss

    def loss_with_preemption(self, phase, batch, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster scheduler sends before preemption
        return real_loss(self, phase, batch, step)

    monkeypatch.setattr(LCM, "loss", loss_with_preemption)
    args_b = run_args(tiny_teacher, caption_folder, tmp_path / "b", resume_from_checkpoint="latest", **common)
    assert main(["distill"] + args_b) == 128 + signal.SIGTERM  # stopped after saving: 143, not "finished"
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-2"]
    assert not (tmp_path / "b" / "unet").exists()  # stopped early: no export yet
    monkeypatch.setattr(LCM, "loss", real_loss)
    assert main(["distill"] + args_b) == 0

    for name in ("model.safetensors",):  # the student as saved by accelerate
        a = load_file(str(tmp_path / "a" / "checkpoint-4" / name))
        b = load_file(str(tmp_path / "b" / "checkpoint-4" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = (read_state_file(tmp_path / x / "checkpoint-4")["objects"]["target"] for x in ("a", "b"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # EMA target θ⁻
    oa = torch.load(tmp_path / "a" / "checkpoint-4" / "optimizer.bin", weights_only=False)
    ob = torch.load(tmp_path / "b" / "checkpoint-4" / "optimizer.bin", weights_only=False)
    assert all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"]) for i in oa["state"])
    assert oa["param_groups"][0]["lr"] == ob["param_groups"][0]["lr"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the exported student


def test_cli_run_writes_everything_and_reloads_in_vanilla_diffusers(tiny_teacher, caption_folder, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from fewstep.diffusion.sampling import sample_images
    from fewstep.models.bundle import load_bundle

    out = tmp_path / "run"
    rc = main(["distill"] + run_args(tiny_teacher, caption_folder, out, max_train_steps=3, checkpointing_steps=1,
                       checkpoints_total_limit=2, validation_steps=3, report_to="tensorboard",
                       validation_prompts="a handwritten digit one|a photo of a cat",
                       validation_inference_steps="1 2"))
    assert rc == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # rotated
    assert not list(out.glob(".tmp-checkpoint-*"))
    grid = out / "validation" / "step-0000003.png"
    from PIL import Image

    assert Image.open(grid).size == (2 * 32, 2 * 32)  # 2 prompts × 2 step counts
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert "LCMScheduler" in (out / "README.md").read_text()
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == ["diffusers", "LCMScheduler"]

    # The exact recipe: the teacher pipeline with the student UNet swapped in.
    unet = UNet2DConditionModel.from_pretrained(out / "unet")
    assert unet.config.time_cond_proj_dim == 256
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher, unet=unet, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    prompt = "a handwritten digit seven"
    ref = pipe(prompt, num_inference_steps=4, guidance_scale=6.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(5)).images[0]
    bundle = load_bundle(str(out))
    ours = sample_images(bundle, bundle.denoiser, LCMScheduler.from_pretrained(out / "scheduler"), [prompt], [5], 4,
                         6.0, 32, 32)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() < 1e-5
    assert ref.std() > 0  # not a blank image

    # `fewstep sample` writes the same picture.
    png = tmp_path / "s.png"
    assert main(["sample", "--model", str(out), "--prompt", prompt, "--num_inference_steps", "4",
                 "--guidance_scale", "6", "--seed", "5", "--output", str(png)]) == 0
    got = np.asarray(Image.open(png)).astype(np.float32) / 255
    assert np.abs(got - ref).max() <= 1 / 255 + 1e-6


def test_empty_prompt_dropout_and_student_init(tiny_teacher, caption_folder, tmp_path):
    tr = make_trainer(tiny_teacher, caption_folder, tmp_path / "o")
    tr.start()
    batch = tr._next_batch()
    _, cond = tr.bundle.encode_batch(batch, drop_prob=1.0)
    assert torch.equal(cond["encoder_hidden_states"], tr.bundle.uncond(len(batch["caption"]))["encoder_hidden_states"])
    _, cond = tr.bundle.encode_batch(batch, drop_prob=0.0)
    assert not torch.equal(cond["encoder_hidden_states"][0], tr.bundle.uncond(1)["encoder_hidden_states"][0])
    student = tr.acc.unwrap_model(tr.method.student)
    # Zero-initialised guidance projection: at step 0 the student IS the teacher, for any w.
    from fewstep.diffusion.guidance import guidance_scale_embedding

    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 259])
    c = tr.bundle.encode_text(["a photo of a cat", "a handwritten digit one"])["encoder_hidden_states"]
    with torch.no_grad():
        a = student(z, t, encoder_hidden_states=c, timestep_cond=guidance_scale_embedding(torch.tensor([3., 12.]), 256))
        b = tr.bundle.denoiser(z, t, encoder_hidden_states=c)
    assert torch.allclose(a.sample, b.sample, atol=1e-5)
    teacher_sd = tr.bundle.denoiser.state_dict()
    for k, v in student.state_dict().items():
        if k.startswith("time_embedding.cond_proj"):
            continue
        assert torch.equal(v, teacher_sd[k]), k
    assert student.time_embedding.cond_proj.in_features == 256


def test_gradient_accumulation_and_bf16_autocast(tiny_teacher, caption_folder, tmp_path):
    """Two micro-batches per optimizer step; bf16 autocast with the teacher held in bf16; the student
    and its optimizer state stay fp32."""
    tr = make_trainer(tiny_teacher, caption_folder, tmp_path / "o", gradient_accumulation_steps=2,
                      mixed_precision="bf16", cast_teacher_unet=True, max_train_steps=2)
    tr.start()
    before = {k: v.clone() for k, v in tr.acc.unwrap_model(tr.method.student).state_dict().items()}
    logs = tr.step()
    assert tr.state.step == 1 and tr.state.batch_in_epoch == 2  # one step consumed two batches
    assert tr.bundle.denoiser.dtype == torch.bfloat16 and tr.bundle.vae.dtype == torch.bfloat16
    student = tr.acc.unwrap_model(tr.method.student)
    assert student.dtype == torch.float32
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert np.isfinite(logs["loss"]) and logs["grad_norm"] > 0
    state = tr.opts["student"].optimizer.state
    assert all(s["exp_avg"].dtype == torch.float32 for s in state.values())


def test_student_config_override_survives_in_memory_teachers():
    """A teacher built in memory carries `_use_default_values`; it must not swallow time_cond_proj_dim."""
    from fewstep.models.sd import SDBundle
    from fewstep.testing import tiny_sd_components

    p = tiny_sd_components()
    b = SDBundle("mem", {k: p[k] for k in ("tokenizer", "text_encoder", "vae", "unet")}, dict(p["scheduler"].config))
    student = b.new_denoiser(guidance_dim=64)
    assert student.config.time_cond_proj_dim == 64 and student.time_embedding.cond_proj is not None
