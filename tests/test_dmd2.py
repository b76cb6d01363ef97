"""DMD2 on the tiny teacher: the DM loss against an independent formula, the two time-scale schedule,
recorded first-step losses of each phase (full, LoRA fake score, GAN head, multi-step), the
regression loss on teacher noise → image pairs, exact resume, and export + reload in vanilla diffusers."""

import csv
import json
import os
import signal

import numpy as np
import pytest
import torch

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.config import ConfigError
from fewstep.methods.dmd2 import DMD2, dm_loss, phase_of, training_timesteps
from fewstep.training.trainer import Trainer


def dmd2_args(teacher, data, out, **kw):
    args = dict(method="dmd2", dfake_gen_update_ratio=1, learning_rate=1e-4, real_guidance_scale=2.0)
    args.update(kw)
    return run_args(teacher, data, out, **args)


def dmd2_trainer(teacher, data, out, **kw) -> Trainer:
    return Trainer(parse_run(dmd2_args(teacher, data, out, **kw)))


def test_dm_loss_and_gradient_equal_the_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8, 8, requires_grad=True)
    x0_real, x0_fake = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x0_real[1] = x[1].detach()  # p_real = 0 for sample 1: the normalisation divides by 0
    loss, g = dm_loss(x, x0_real, x0_fake)
    loss.backward()

    # Written out independently: g_i = (p_real − p_fake)_i / mean|p_real|_i; a 0/0 or c/0 sample gives 0.
    ref_g = torch.zeros_like(x)
    for i in range(3):
        p_real, p_fake = x[i].detach() - x0_real[i], x[i].detach() - x0_fake[i]
        denom = p_real.abs().mean()
        if denom > 0:
            ref_g[i] = (p_real - p_fake) / denom
    assert torch.allclose(g, ref_g, atol=1e-6) and torch.all(g[1] == 0)
    assert loss.item() == pytest.approx(0.5 * (ref_g**2).mean().item(), rel=1e-6)  # ½ mean((x − (x − g))²)
    assert torch.allclose(x.grad, ref_g / x.numel(), atol=1e-9)  # the generator follows g
    # The direction points from the fake score's x̂₀ toward the real one: x̂₀_fake − x̂₀_real, normalised.
    assert torch.allclose(g[0], (x0_fake[0] - x0_real[0]) / (x[0].detach() - x0_real[0]).abs().mean(), atol=1e-5)


def test_update_ratio_schedule_and_only_the_phase_group_moves(tiny_teacher, caption_folder, tmp_path):
    assert [phase_of(s, 3) for s in range(9)] == ["generator", "guidance", "guidance", "guidance"] * 2 + ["generator"]
    assert [phase_of(s, 1) for s in range(4)] == ["generator", "guidance"] * 2
    tr = dmd2_trainer(tiny_teacher, caption_folder, tmp_path / "o", dfake_gen_update_ratio=2)
    tr.start()
    gen, fake = tr.acc.unwrap_model(tr.method.generator), tr.method._fake_unet()
    for expected in ("generator", "guidance", "guidance", "generator"):
        g0 = [p.detach().clone() for p in gen.parameters()]
        f0 = [p.detach().clone() for p in fake.parameters()]
        logs = tr.step()
        assert f"lr/{expected}" in logs
        g_moved = any(not torch.equal(a, b) for a, b in zip(g0, gen.parameters()))
        f_moved = any(not torch.equal(a, b) for a, b in zip(f0, fake.parameters()))
        assert (g_moved, f_moved) == (expected == "generator", expected == "guidance")


def test_timesteps_match_lcm_scheduler():
    from diffusers import LCMScheduler

    assert training_timesteps(1000, 4, 999) == [999, 749, 499, 249]
    assert training_timesteps(1000, 1, 399) == [399]
    for k in (1, 2, 4, 5, 8):
        s = LCMScheduler(original_inference_steps=k)
        s.set_timesteps(k)
        assert s.timesteps.tolist() == training_timesteps(1000, k, 999)


# Recorded on CPU (torch 2.13, diffusers 0.42), seed 0: (generator step, fake-score step) losses.
RECORDED = {
    "full": (6.175086309667677e-05, 1.0211158990859985),
    "lora": (0.0004452593857422471, 1.1226582527160645),
    "gan": (0.0035634487867355347, 1.2094701528549194),  # re-recorded: real latents now contiguous (randn_like)
    "multistep": (0.0004237967368680984, 1.220363974571228),
}
VARIANTS = {
    "full": {},
    "lora": dict(fake_score_lora_rank=4),
    "gan": dict(gen_cls_loss_weight=5e-3, guidance_cls_loss_weight=1e-2),
    "multistep": dict(num_denoising_step=4, backward_simulation=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_step_of_each_phase_is_recorded(variant, tiny_teacher, caption_folder, tmp_path):
    tr = dmd2_trainer(tiny_teacher, caption_folder, tmp_path / "o", **VARIANTS[variant])
    tr.start()
    gen_logs, fake_logs = tr.step(), tr.step()
    assert "lr/generator" in gen_logs and "lr/guidance" in fake_logs
    assert (gen_logs["loss"], fake_logs["loss"]) == pytest.approx(RECORDED[variant], rel=1e-4)
    assert gen_logs["grad_norm"] > 0 and fake_logs["grad_norm"] > 0
    if variant == "gan":
        assert 0 < gen_logs["gen_cls_loss"] and 0 < fake_logs["guidance_cls_loss"]
        assert {"d_real", "d_fake"} <= fake_logs.keys()


def test_networks_start_from_the_teacher_and_lora_real_score_is_the_teacher(tiny_teacher, caption_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    tr = dmd2_trainer(tiny_teacher, caption_folder, tmp_path / "o", fake_score_lora_rank=4)
    tr.start()
    m = tr.method
    ref = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    assert m._fake_unet() is tr.bundle.denoiser  # one UNet for real and fake score
    gen_sd = tr.acc.unwrap_model(m.generator).state_dict()
    assert all(torch.equal(v, gen_sd[k]) for k, v in ref.state_dict().items())
    trainable = [n for n, p in m._fake_unet().named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    for _ in range(2):
        tr.step()
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 300])
    c = tr.bundle.encode_text(["a photo of a cat", "a handwritten digit one"])
    with torch.no_grad():
        real = m.real_score(z, t, c)
        want = ref(z, t, encoder_hidden_states=c["encoder_hidden_states"]).sample
        fake = m.fake_score(z, t, c)
    assert torch.allclose(real, want, atol=1e-5)  # adapters off = the teacher, exactly
    assert not torch.allclose(fake, want, atol=1e-5)  # the fake score has learnt something


def test_bad_options_are_rejected(tiny_teacher, caption_folder, tmp_path):
    with pytest.raises(ConfigError, match="backward_simulation"):
        parse_run(dmd2_args(tiny_teacher, caption_folder, tmp_path, backward_simulation=True))
    with pytest.raises(ConfigError, match="min_step_percent"):
        parse_run(dmd2_args(tiny_teacher, caption_folder, tmp_path, min_step_percent=0.9, max_step_percent=0.5))
    m = parse_run(dmd2_args(tiny_teacher, caption_folder, tmp_path, cls_on_clean_image=True)).method
    assert (m.gen_cls_loss_weight, m.guidance_cls_loss_weight) == (5e-3, 1e-2)  # DMD2's switch, DMD2's weights
    with pytest.raises(ConfigError, match="must divide"):
        dmd2_trainer(tiny_teacher, caption_folder, tmp_path / "o", num_denoising_step=3)
    # DMD2's own spellings
    spec = parse_run(["--method", "dmd2", "--model_id", str(tiny_teacher), "--output_path", str(tmp_path),
                      "--generator_lr", "2e-6", "--guidance_lr", "3e-6", "--dfake_gen_update_ratio", "5"])
    assert spec.train.pretrained_teacher_model == str(tiny_teacher) and spec.method.guidance_lr == 3e-6


def _teacher_pairs(teacher, out_dir, n=4):
    """Teacher noise → image pairs as `fewstep generate` writes them: image,prompt,seed,rand_device."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    out_dir.mkdir(parents=True)
    rows = []
    for i in range(n):
        prompt, seed = f"a handwritten digit {['one', 'two', 'three', 'four'][i]}", 100 + i
        img = pipe(prompt, num_inference_steps=4, guidance_scale=2.0, height=32, width=32,
                   generator=torch.Generator("cpu").manual_seed(seed)).images[0]
        img.save(out_dir / f"{i}.png")
        rows.append({"image": f"{i}.png", "prompt": prompt, "seed": seed, "rand_device": "cpu"})
    with open(out_dir / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "prompt", "seed", "rand_device"])
        w.writeheader()
        w.writerows(rows)
    return out_dir / "metadata.csv"


def test_regression_loss_on_teacher_pairs(tiny_teacher, caption_folder, tmp_path):
    meta = _teacher_pairs(tiny_teacher, tmp_path / "pairs")
    tr = dmd2_trainer(tiny_teacher, meta, tmp_path / "o", caption_column="prompt", regression_loss_weight=1.0,
                      dm_loss_weight=0.0, train_batch_size=2, real_guidance_scale=1.75)  # (DM loss off: its default)
    tr.start()
    batch = tr._next_batch()
    assert set(batch["meta"]) >= {"seed", "rand_device"}
    torch.manual_seed(7)
    got = tr.method.loss("generator", batch, 0).logs["loss_regression"].item()

    # Independently: the pipeline's own initial latents for each seed, G at t = 999, latents of the image.
    b, gen = tr.bundle, tr.acc.unwrap_model(tr.method.generator)
    torch.manual_seed(7)
    torch.randn(2, 4, 8, 8)  # the generator phase's own noise draw comes first
    ref = 0.0
    with torch.no_grad():
        text = b.encode_text(list(batch["caption"]))["encoder_hidden_states"]
        noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(int(s)))
                           for s in batch["meta"]["seed"]])
        eps = gen(noise, torch.tensor([999, 999]), encoder_hidden_states=text).sample
        ac = b.schedule.alphas_cumprod[999].float()
        x0 = (noise - (1 - ac).sqrt() * eps) / ac.sqrt()
        lat = b.vae.encode(batch["pixel_values"]).latent_dist.sample() * b.vae.config.scaling_factor
        ref = torch.mean((x0 - lat) ** 2).item()
    assert got == pytest.approx(ref, rel=1e-4)

    # Plain image folders carry no noise seeds: a clear error naming the fix.
    tr2 = dmd2_trainer(tiny_teacher, caption_folder, tmp_path / "o2", regression_loss_weight=1.0)
    tr2.start()
    with pytest.raises(ConfigError, match="seed and rand_device"):
        tr2.step()


@pytest.mark.slow
def test_sigterm_then_resume_is_exact(tiny_teacher, caption_folder, tmp_path, monkeypatch):
    """5 steps straight == SIGTERM during step 2 + resume: generator, fake score + GAN head, both
    optimizers, and the phase position all continue exactly."""
    from safetensors.torch import load_file

    common = dict(max_train_steps=5, checkpointing_steps=5, dfake_gen_update_ratio=2, gen_cls_loss_weight=5e-3,
                  guidance_cls_loss_weight=1e-2, lr_scheduler="linear", lr_warmup_steps=2)
    assert main(["distill", *dmd2_args(tiny_teacher, caption_folder, tmp_path / "a", **common)]) == 0
    real_loss = DMD2.loss

    def preempted(self, phase, batch, step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, phase, batch, step)

    monkeypatch.setattr(DMD2, "loss", preempted)
    args_b = dmd2_args(tiny_teacher, caption_folder, tmp_path / "b", resume_from_checkpoint="latest", **common)
    assert main(["distill", *args_b]) == 128 + signal.SIGTERM  # stopped after saving
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-2"]
    monkeypatch.setattr(DMD2, "loss", real_loss)
    assert main(["distill", *args_b]) == 0

    a, b = tmp_path / "a" / "checkpoint-5", tmp_path / "b" / "checkpoint-5"
    for name in ("model.safetensors", "model_1.safetensors"):  # generator; fake score + head
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert any("cls_head" in k for k in load_file(str(a / "model_1.safetensors")))
    for name in ("optimizer.bin", "optimizer_1.bin"):
        oa, ob = (torch.load(p / name, weights_only=False) for p in (a, b))
        assert oa["state"] and all(torch.equal(oa["state"][i]["exp_avg_sq"], ob["state"][i]["exp_avg_sq"])
                                   for i in oa["state"])
        assert oa["param_groups"][0]["lr"] == ob["param_groups"][0]["lr"]
    ua, ub = (load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")) for p in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(ua[k], ub[k]) for k in ua)


@pytest.mark.parametrize("kw,timesteps", [(dict(num_denoising_step=2), [999, 499]),
                                          (dict(conditioning_timestep=399), [399])])
def test_export_reloads_in_vanilla_diffusers(kw, timesteps, tiny_teacher, caption_folder, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler

    out = tmp_path / "run"
    assert main(["distill", *dmd2_args(tiny_teacher, caption_folder, out, max_train_steps=2, **kw)]) == 0
    hints = json.loads((out / "fewstep_sampling.json").read_text())
    K = len(timesteps)
    assert hints["num_inference_steps"] == K and hints["guidance_scale"] == 0.0
    pipe = DiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert isinstance(pipe.scheduler, LCMScheduler)
    extra = {"timesteps": hints["timesteps"]} if "timesteps" in hints else {}
    assert ("timesteps" in hints) == (timesteps[0] != 999)
    prompt = "a handwritten digit seven"
    ref = pipe(prompt, num_inference_steps=K, guidance_scale=0.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(5), **extra).images[0]
    assert pipe.scheduler.timesteps.tolist() == timesteps
    assert ref.std() > 0

    # fewstep's own sampler on the trained generator gives the same image.
    tr = dmd2_trainer(tiny_teacher, caption_folder, tmp_path / "o", max_train_steps=2, **kw)
    from safetensors.torch import load_file

    gen = tr.acc.unwrap_model(tr.method.generator)
    gen.load_state_dict(load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")))
    ours = tr.method.sample([prompt], [5], K, 0.0)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() < 1e-5

    # `fewstep eval` samples it at the same timesteps.
    from fewstep.eval.run import EvalRun, generate

    imgs, _ = generate(EvalRun("dmd2", str(out), "lcm", K, 0.0), [prompt], [5], 32, 1, "cpu", {})
    assert np.abs(imgs[0].permute(1, 2, 0).numpy() - ref).max() < 1e-5

    # `fewstep sample` reads the timesteps hint.
    png = tmp_path / "s.png"
    assert main(["sample", "--model", str(out), "--prompt", prompt, "--seed", "5", "--output", str(png)]) == 0
    from PIL import Image

    got = np.asarray(Image.open(png)).astype(np.float32) / 255
    assert np.abs(got - ref).max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_sdxl_teacher_one_step_of_each_phase(tiny_sdxl, caption_folder, tmp_path):
    """The SDXL family (two text encoders, pooled embeds, time ids; zeros as uncond) through both phases."""
    tr = dmd2_trainer(tiny_sdxl, caption_folder, tmp_path / "o", fake_score_lora_rank=4, gen_cls_loss_weight=5e-3,
                      guidance_cls_loss_weight=1e-2, conditioning_timestep=399)
    tr.start()
    gen = tr.acc.unwrap_model(tr.method.generator)
    g0 = [p.detach().clone() for p in gen.parameters()]
    gen_logs, fake_logs = tr.step(), tr.step()
    assert (gen_logs["loss"], fake_logs["loss"]) == pytest.approx(RECORDED_SDXL, rel=1e-4)
    assert any(not torch.equal(a, b) for a, b in zip(g0, gen.parameters()))
    img = tr.method.sample(["a photo of a cat"], [0], 1, 0.0)
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


RECORDED_SDXL = (0.004582739435136318, 0.9809319972991943)
