"""`fewstep generate` and direct distillation on the tiny SD teacher: noise regeneration, resumption,
recorded loss, an unrolled gradient against finite differences, export and vanilla reload."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.config import ConfigError
from fewstep.training.trainer import Trainer

PROMPTS = ["a handwritten digit three", "a photo of a cat"]
TEACHER_STEPS, TEACHER_W = 6, 3.0


@pytest.fixture(scope="module")
def teacher_data(tiny_teacher, tmp_path_factory) -> Path:
    from fewstep.generate import generate

    out = tmp_path_factory.mktemp("direct") / "data"
    generate(str(tiny_teacher), str(out), PROMPTS, teacher_steps=TEACHER_STEPS, teacher_guidance_scale=TEACHER_W,
             student_steps=2, student_guidance_scale=1.0, images_per_prompt=2, seed=10, save_latents=True,
             batch_size=3, progress=False)
    return out


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def direct_args(teacher, data, out, **kw):
    base = dict(method="direct", learning_rate=1e-3)
    base.update(kw)
    return run_args(teacher, data, out, **base)


def test_generate_rows_and_bit_exact_noise(tiny_teacher, teacher_data):
    """The recorded (seed, rand_device) regenerate the teacher's initial noise bit for bit: the vanilla
    pipeline seeded the same way lands on the saved latents and the PNG."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from PIL import Image
    from safetensors.torch import load_file

    from fewstep.diffusion.noise import initial_noise

    rows = _rows(teacher_data / "metadata.csv")
    assert list(rows[0]) == ["image", "prompt", "seed", "rand_device", "num_inference_steps", "cfg_scale", "latents"]
    assert [(r["prompt"], r["seed"], r["num_inference_steps"], r["cfg_scale"]) for r in rows] == [
        (PROMPTS[0], "10", "2", "1.0"), (PROMPTS[0], "11", "2", "1.0"),
        (PROMPTS[1], "12", "2", "1.0"), (PROMPTS[1], "13", "2", "1.0")]
    assert not list(teacher_data.glob("metadata.part-*"))
    a = initial_noise(12, "cpu", (4, 8, 8))
    b = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(12))[0]
    assert torch.equal(a, b)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # the teacher folder's own class
    r = rows[2]
    lat = pipe(r["prompt"], num_inference_steps=TEACHER_STEPS, guidance_scale=TEACHER_W, height=32, width=32,
               output_type="latent", generator=torch.Generator(r["rand_device"]).manual_seed(int(r["seed"]))).images
    saved = load_file(str(teacher_data / r["latents"]))["latents"]
    assert (lat[0] - saved).abs().max() < 1e-5
    with torch.no_grad():
        img = pipe.image_processor.postprocess(pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample,
                                               output_type="np")[0]
    png = np.asarray(Image.open(teacher_data / r["image"])).astype(np.float32) / 255
    assert np.abs(png - img).max() <= 1 / 255 + 1e-6


def test_generate_resumes_and_refuses_changed_plan(tiny_teacher, tmp_path):
    from fewstep.generate import generate, read_prompts

    txt = tmp_path / "p.txt"
    txt.write_text("a photo of a cat\n\na handwritten digit one\n")
    cs = tmp_path / "p.csv"
    cs.write_text('id,prompt\n1,"a photo of a dog, small"\n')
    assert read_prompts(str(txt), None) == ["a photo of a cat", "a handwritten digit one"]
    assert read_prompts(str(cs), None) == ["a photo of a dog, small"]
    with pytest.raises(ConfigError, match="prompt_column"):
        read_prompts(str(cs), None, "caption")
    kw = dict(teacher_steps=2, progress=False, batch_size=2)
    out = tmp_path / "d"
    assert generate(str(tiny_teacher), str(out), ["a photo of a cat"] * 5, num_images=3, **kw)["generated"] == 3
    first = (out / "images" / "0000001.png").read_bytes()
    # A crash after two more rows reached the part file but before the merge:
    part = out / "metadata.part-0.csv"
    part.write_text("image,prompt,seed,rand_device,num_inference_steps,cfg_scale\n"
                    "images/0000003.png,a photo of a cat,3,cpu,4,1.0\n")
    (out / "images" / "0000003.png").write_bytes(first)
    r = generate(str(tiny_teacher), str(out), ["a photo of a cat"] * 5, **kw)
    assert (r["generated"], r["skipped"]) == (1, 4)  # only row 4 was missing
    assert [x["image"] for x in _rows(out / "metadata.csv")] == [f"images/{i:07d}.png" for i in range(5)]
    assert not part.exists()
    with pytest.raises(ConfigError, match="same --prompts"):
        generate(str(tiny_teacher), str(out), ["a photo of a dog"] * 5, **kw)


# Recorded on CPU (torch 2.13, diffusers 0.42): first-step loss on the module's teacher data, seed 0.
RECORDED = {"final": 84.8116226196289, "trajectory": 50.33372497558594}


@pytest.mark.parametrize("variant", ["final", "trajectory"])
def test_first_step_loss_is_recorded(variant, tiny_teacher, teacher_data, tmp_path):
    tr = Trainer(parse_run(direct_args(tiny_teacher, teacher_data, tmp_path / "o", direct_variant=variant,
                                       max_train_steps=1)))
    tr.start()
    logs = tr.step()
    assert logs["loss"] == pytest.approx(RECORDED[variant], rel=1e-4)
    assert logs["grad_norm"] > 0


def test_loss_equals_vanilla_pipeline_reference(tiny_teacher, teacher_data, tmp_path):
    """The method's 'final' loss at step 0 equals the MSE between the vanilla pipeline's K-step output
    (DDIM trailing, same seed) and the saved teacher latents, computed without fewstep."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from safetensors.torch import load_file

    tr = Trainer(parse_run(direct_args(tiny_teacher, teacher_data, tmp_path / "o", max_train_steps=1,
                                       train_batch_size=4)))
    tr.start()
    batch = tr._next_batch()
    loss = float(tr.method.loss("student", batch, 0).loss)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_teacher, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    sq = []
    for img_path, prompt, seed in zip(batch["meta"]["latents"], batch["caption"], batch["meta"]["seed"]):
        lat = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="latent",
                   generator=torch.Generator().manual_seed(int(seed))).images[0]
        sq.append((lat - load_file(str(teacher_data / img_path))["latents"]) ** 2)
    assert loss == pytest.approx(float(torch.stack(sq).mean()), rel=1e-4)


def test_unrolled_gradient_matches_finite_differences():
    """d/dθ of the K-step unrolled loss, through checkpointed steps and the scheduler, in float64,
    against a central difference along a random direction of all UNet weights."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from fewstep.diffusion.sampling import unroll

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4).double()
    sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                          set_alpha_to_one=False, timestep_spacing="trailing")
    x_T = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    target = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    text = torch.randn(2, 3, 8, dtype=torch.float64)

    def loss_fn():
        states = unroll(lambda z, t: unet(z, t, encoder_hidden_states=text).sample, sched, x_T, 3, checkpoint=True)
        return torch.nn.functional.mse_loss(states[-1], target)

    params = list(unet.parameters())
    loss_fn().backward()
    direction = [torch.randn_like(p) for p in params]
    analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
    h = 1e-6
    with torch.no_grad():
        for p, d in zip(params, direction):
            p.add_(h * d)
        up = loss_fn().item()
        for p, d in zip(params, direction):
            p.sub_(2 * h * d)
        down = loss_fn().item()
    numeric = (up - down) / (2 * h)
    assert analytic == pytest.approx(numeric, rel=1e-6)
    assert abs(analytic) > 1e-3


def test_trajectory_levels_follow_the_scheduler():
    """Starting on the path z = a x₀ + s ε and stepping with the exact ε, the scheduler's states are
    a_k x₀ + s_k ε with the (a_k, s_k) the trajectory variant uses; for flow matching with the exact
    velocity ε − x₀ too."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    from fewstep.diffusion.sampling import unroll
    from fewstep.methods.direct import state_levels

    x0, eps = torch.randn(1, 4, 8, 8, dtype=torch.float64), torch.randn(1, 4, 8, 8, dtype=torch.float64)
    ddim = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, timestep_spacing="trailing")
    ddim.set_timesteps(4)
    a0 = float(ddim.alphas_cumprod[ddim.timesteps[0]]) ** 0.5
    states = unroll(lambda z, t: eps, ddim, a0 * x0 + (1 - a0 ** 2) ** 0.5 * eps, 4, checkpoint=False)
    for z, (a, s) in zip(states[1:], state_levels(ddim)):
        assert torch.allclose(z, a * x0 + s * eps, atol=1e-5)  # the scheduler keeps ᾱ in float32
    flow = FlowMatchEulerDiscreteScheduler(shift=3.0)
    states = unroll(lambda z, t: eps - x0, flow, eps, 3, checkpoint=False)
    levels = state_levels(flow)
    assert levels[-1] == (1.0, 0.0)
    for z, (a, s) in zip(states[1:], levels):
        assert torch.allclose(z, a * x0 + s * eps, atol=1e-6)


def test_generate_train_export_reload_in_vanilla_diffusers(tiny_teacher, teacher_data, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from fewstep.diffusion.sampling import sample_images, unroll
    from fewstep.eval.run import plan_runs
    from fewstep.models.bundle import load_bundle

    out = tmp_path / "run"
    assert main(["distill"] + direct_args(tiny_teacher, teacher_data, out, max_train_steps=2,
                                          direct_variant="trajectory")) == 0
    hints = json.loads((out / "fewstep_sampling.json").read_text())
    assert hints == {"num_inference_steps": 2, "valid_steps": [2, 2], "guidance_scale": 1.0, "sampler": "ddim"}
    assert "DDIMScheduler" in (out / "README.md").read_text()
    (run,) = plan_runs([("direct", str(out))], [1, 2, 4], [50], ["ddim"])
    assert (run.scheduler, run.steps, run.guidance_scale) == ("ddim", 2, 1.0)

    # The vanilla pipeline with the exported folder as it is.
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.scheduler.config.timestep_spacing == "trailing"
    prompt = PROMPTS[1]
    ref = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(12)).images[0]
    bundle = load_bundle(str(out))
    sched = DDIMScheduler.from_pretrained(out / "scheduler")
    ours = sample_images(bundle, bundle.denoiser, sched, [prompt], [12], 2, 1.0, 32, 32)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() < 1e-5 and ref.std() > 0
    # ... and the unroll training differentiates is that same sampler.
    from fewstep.diffusion.noise import initial_noise

    cond = bundle.encode_text([prompt])
    with torch.no_grad():
        z = unroll(lambda z, t: bundle.denoise(bundle.denoiser, z, t, cond), sched, initial_noise(12, "cpu", (4, 8, 8))[None],
                   2, checkpoint=False)[-1]
    assert np.abs(bundle.decode(z)[0].permute(1, 2, 0).numpy() - ref).max() < 1e-5


def test_lora_student_and_image_targets(tiny_teacher, teacher_data, tmp_path):
    """LoRA variant without saved latents (targets from the VAE posterior mean): trains only adapters,
    writes a LoRA folder that load_bundle fuses and evaluates with its DDIM scheduler."""
    from fewstep.models.bundle import load_bundle

    rows = _rows(teacher_data / "metadata.csv")
    meta = tmp_path / "no_latents.csv"
    with meta.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0])[:-1], extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "image": str(teacher_data / r["image"])})
    out = tmp_path / "lora"
    tr = Trainer(parse_run(direct_args(tiny_teacher, meta, out, lora_rank=4, max_train_steps=1)))
    before = {n: p.detach().clone() for n, p in tr.method.student.named_parameters() if "lora" not in n}
    assert tr.train() == out
    after = dict(tr.method.student.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # base weights frozen
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((out / "fewstep_sampling.json").read_text())["sampler"] == "ddim"
    b = load_bundle(str(out), weights=True)
    assert b.scheduler_config["_class_name"] == "DDIMScheduler"


def test_bad_input_is_named(tiny_teacher, teacher_data, caption_folder, tmp_path):
    with pytest.raises(ConfigError, match="direct_variant"):
        parse_run(direct_args(tiny_teacher, teacher_data, tmp_path / "o", direct_variant="lpips"))
    with pytest.raises(ConfigError, match="random_flip"):
        Trainer(parse_run(direct_args(tiny_teacher, teacher_data, tmp_path / "o", random_flip=True)))
    tr = Trainer(parse_run(direct_args(tiny_teacher, caption_folder, tmp_path / "o2")))
    tr.start()
    with pytest.raises(ConfigError, match="fewstep generate"):
        tr.method.loss("student", tr._next_batch(), 0)


@pytest.fixture(scope="module")
def direct_lora(tiny_teacher, teacher_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("direct-lora") / "out"
    assert main(["distill"] + direct_args(tiny_teacher, teacher_data, out, lora_rank=4, max_train_steps=2)) == 0
    return out


def test_lora_export_fuse_keeps_the_students_scheduler(direct_lora, tmp_path):
    """The fused folder holds the DDIMScheduler (trailing) the LoRA student was trained with, not an
    LCMScheduler: vanilla diffusers on it gives `fewstep sample`'s images of the LoRA folder."""
    from diffusers import DDIMScheduler, DiffusionPipeline
    from PIL import Image

    fused = tmp_path / "fused"
    assert main(["export", "--model", str(direct_lora), "--fuse", "--output_dir", str(fused)]) == 0
    assert json.loads((fused / "model_index.json").read_text())["scheduler"] == ["diffusers", "DDIMScheduler"]
    hints = json.loads((fused / "fewstep_sampling.json").read_text())
    assert hints == json.loads((direct_lora / "fewstep_sampling.json").read_text()) and hints["sampler"] == "ddim"
    pipe = DiffusionPipeline.from_pretrained(fused)
    assert type(pipe.scheduler) is DDIMScheduler
    assert dict(pipe.scheduler.config) == dict(DDIMScheduler.from_pretrained(direct_lora / "scheduler").config)
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    ref = pipe(PROMPTS[1], num_inference_steps=hints["num_inference_steps"], guidance_scale=hints["guidance_scale"],
               height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(12)).images[0]
    png = tmp_path / "sample.png"
    assert main(["sample", "--model", str(direct_lora), "--prompt", PROMPTS[1], "--seed", "12", "--output", str(png)]) == 0
    ours = np.asarray(Image.open(png)).astype(np.float64) / 255
    assert ours.shape == ref.shape and np.abs(ours - ref).max() <= 1.5 / 255 and ref.std() > 0


def test_lora_folder_card_snippet_runs(direct_lora, tiny_teacher, tmp_path):
    """The card of a LoRA folder (no model_index.json) loads the base model, the adapter and the trailing
    DDIMScheduler at K steps and the trained guidance (executed as written)."""
    from diffusers import DDIMScheduler

    from conftest import card_snippet
    from fewstep.diffusion.sampling import sample_images
    from fewstep.models.bundle import load_bundle

    code = card_snippet(direct_lora)
    assert f'from_pretrained("{tiny_teacher}")' in code and "num_inference_steps=2, guidance_scale=1.0" in code
    ns: dict = {}
    exec(code, ns)
    pipe, image = ns["pipe"], np.asarray(ns["image"])
    assert type(pipe.scheduler) is DDIMScheduler and pipe.scheduler.config.timestep_spacing == "trailing"
    assert image.shape == (32, 32, 3) and image.std() > 0
    ref = pipe(PROMPTS[1], num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(12)).images[0]
    bundle = load_bundle(str(direct_lora))
    sched = DDIMScheduler.from_config(bundle.scheduler_config)
    ours = sample_images(bundle, bundle.denoiser, sched, [PROMPTS[1]], [12], 2, 1.0, 32, 32)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() < 2e-4



def test_eval_takes_the_lora_folder(direct_lora, tmp_path):
    """`fewstep eval` loads a LoRA folder as `fewstep sample` does, with the folder's own sampler."""
    assert main(["eval", "--model", f"direct-lora={direct_lora}", "--features", "random", "--num_images", "2",
                 "--steps", "1", "--batch_size", "2", "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert [(r["label"], r["scheduler"], r["steps"], r["guidance_scale"]) for r in rows] == [("direct-lora", "ddim", 2, 1.0)]
    assert np.isfinite(rows[0]["frechet_distance"])


def test_generate_bad_input_exits_2(tiny_teacher, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n")
    base = ["generate", "--teacher", str(tiny_teacher), "--output_dir", str(tmp_path / "d"), "--prompts", str(prompts)]
    assert main([*base, "--teacher_scheduler", "foo"]) == 2
    assert "--teacher_scheduler 'foo': unknown scheduler; choose from" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*base, "--rand_device", "cuda"]) == 2
    assert "CUDA is not available on this machine; use --rand_device cpu" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # refused before anything is written


def test_generate_refuses_other_settings_and_resumes_new_prompts(tiny_teacher, tmp_path):
    from fewstep.generate import generate

    kw = dict(teacher_steps=2, progress=False, batch_size=2)
    out = tmp_path / "d"
    assert generate(str(tiny_teacher), str(out), ["a photo of a cat"] * 2, **kw)["generated"] == 2
    recorded = (out / "fewstep_generate.json").read_text()
    assert json.loads(recorded) == {
        "teacher": str(Path(tiny_teacher).resolve()), "teacher_steps": 2, "teacher_guidance_scale": 4.0,
        "teacher_scheduler": "DDIMScheduler", "resolution": 32, "student_steps": 4, "student_guidance_scale": 1.0,
        "rand_device": "cpu", "rows": 2}
    for change, needle in [(dict(resolution=16), "--resolution 32 there, 16 now"),
                           (dict(teacher_steps=3), "--teacher_steps 2 there, 3 now"),
                           (dict(student_steps=2, teacher_guidance_scale=2.0),
                            "--teacher_guidance_scale 4.0 there, 2.0 now, --student_steps 4 there, 2 now")]:
        with pytest.raises(ConfigError, match="other settings") as e:
            generate(str(tiny_teacher), str(out), ["a photo of a cat"] * 3, **{**kw, **change})
        assert needle in str(e.value) and "new --output_dir" in str(e.value)
    assert (out / "fewstep_generate.json").read_text() == recorded and len(_rows(out / "metadata.csv")) == 2
    # A run killed before it wrote the JSON: the rows' own columns still tell the student settings
    (out / "fewstep_generate.json").unlink()
    with pytest.raises(ConfigError, match="--student_steps 4 there, 2 now"):
        generate(str(tiny_teacher), str(out), ["a photo of a cat"] * 2, **{**kw, "student_steps": 2})
    r = generate(str(tiny_teacher), str(out), ["a photo of a cat"] * 2 + ["a photo of a dog"], **kw)
    assert (r["generated"], r["skipped"]) == (1, 2)  # same settings, one new prompt
    assert [x["prompt"] for x in _rows(out / "metadata.csv")] == ["a photo of a cat"] * 2 + ["a photo of a dog"]
    assert json.loads((out / "fewstep_generate.json").read_text())["rows"] == 3
