"""Every method on flow-matching transformers (tiny SD3 and SD3.5 teachers built from configs): LCD's loss
against an independent flow-matching reference, each method's recorded losses, exports that vanilla
StableDiffusion3Pipeline runs with the same images as `fewstep sample`, transformer LoRA files that
`load_lora_weights` loads, and the GAN head's features read from the transformer."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import card_snippet, run_args
from fewstep.cli import main, parse_run
from fewstep.training.trainer import Trainer

NO_T5 = dict(text_encoder_3=None, tokenizer_3=None)  # how vanilla diffusers loads an SD3 folder without T5
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory) -> Path:
    from fewstep.testing import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("flow") / "sd3")


@pytest.fixture(scope="module")
def sd35(tmp_path_factory) -> Path:
    from fewstep.testing import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("flow") / "sd35", variant="3.5")


def trainer(teacher, data, out, **kw) -> Trainer:
    base = dict(learning_rate=1e-3)
    base.update(kw)
    return Trainer(parse_run(run_args(teacher, data, out, **base)))


def test_lcd_loss_equals_a_flow_matching_reference(sd3, caption_folder, tmp_path):
    """LCD on the flow path recomputed from diffusers' own pieces: the training σ table of
    FlowMatchEulerDiscreteScheduler, its noising, the transformer's velocity, CFG at 1 + w, one Euler step
    z_t = z_s + (σ_t − σ_s) v, and f = z − σ v̂ (boundary at σ = 0), for student and EMA target."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tr = trainer(sd3, caption_folder, tmp_path / "o", w_min=2.0, w_max=4.0)
    tr.start()
    batch = tr._next_batch()
    m, b = tr.method, tr.bundle
    torch.manual_seed(7)
    loss = m.loss("student", batch, 0).loss.item()

    torch.manual_seed(7)  # replay the draws in the method's order
    x0 = b.encode_images(batch["pixel_values"])
    B = x0.shape[0]
    n = torch.randint(0, 50, (B,))
    eps = torch.randn_like(x0)
    w = 2.0 + 2.0 * torch.rand(B)
    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3, subfolder="scheduler")
    sig = ref.sigmas.flip(0)  # training σ, level 0 (least noisy) first
    cond = b.encode_text(list(batch["caption"]))
    unc = b.encode_text([""] * B)

    def v(net, z, s, c):
        return net(hidden_states=z, timestep=torch.full((1,), float(s) * 1000), encoder_hidden_states=c[0],
                   pooled_projections=c[1]).sample

    expected = 0.0
    with torch.no_grad():
        for i in range(B):
            k = 20
            s_i = (int(n[i]) + 1) * k - 1
            sigma_s = sig[s_i].item()
            sigma_t = sig[s_i - k].item() if s_i - k >= 0 else 0.0
            ci = (cond["encoder_hidden_states"][i:i + 1], cond["pooled_projections"][i:i + 1])
            ui = (unc["encoder_hidden_states"][i:i + 1], unc["pooled_projections"][i:i + 1])
            z_s = sigma_s * eps[i:i + 1] + (1 - sigma_s) * x0[i:i + 1]  # FlowMatchEuler's scale_noise
            f = z_s - sigma_s * v(m.student, z_s, sigma_s, ci)
            v_c, v_u = v(b.denoiser, z_s, sigma_s, ci), v(b.denoiser, z_s, sigma_s, ui)
            v_g = v_u + (1 + w[i]) * (v_c - v_u)
            z_t = z_s + (sigma_t - sigma_s) * v_g
            target = z_t - sigma_t * v(m.target, z_t, sigma_t, ci)
            expected += torch.mean((f - target) ** 2).item() / B
    assert loss == pytest.approx(expected, rel=1e-4)


# Recorded on CPU (torch 2.13, diffusers 0.42), seed 0, batch 2, lr 1e-3: losses of 3 optimizer steps.
FLOW_CASES = {
    "lcm": dict(method="lcm"),
    "lcm-lora-ema": dict(method="lcm", lora_rank=4, ema_decay=0.9),
    "dmd2-gan": dict(method="dmd2", dfake_gen_update_ratio=1, gen_cls_loss_weight=5e-3, guidance_cls_loss_weight=1e-2,
                     real_guidance_scale=2.0),
    "dmd2-multistep-lora": dict(method="dmd2", dfake_gen_update_ratio=1, num_denoising_step=4,
                                backward_simulation=True, fake_score_lora_rank=4),
    "disback-lora": dict(method="disback", dfake_gen_update_ratio=1, fake_score_lora_rank=4, degradation_steps=1,
                         degradation_interval=1, interval=1, max_train_steps=6),
}
RECORDED = {
    ("lcm", "3"): [0.0006204470992088318, 0.005449894815683365, 0.0002737384056672454],
    ("lcm", "3.5"): [0.0011884375708177686, 0.0017112900968641043, 0.004897986073046923],
    ("lcm-lora-ema", "3"): [0.0005773610901087523, 0.0007254575612023473, 0.00045296785538084805],
    ("lcm-lora-ema", "3.5"): [0.0006332887569442391, 0.0007594776689074934, 0.0006832405924797058],
    ("dmd2-gan", "3"): [0.004267528653144836, 2.5602805614471436, 0.004922253079712391],
    ("dmd2-gan", "3.5"): [0.0056280093267560005, 2.4423880577087402, 0.005043605342507362],
    ("dmd2-multistep-lora", "3"): [0.0003378444234840572, 2.3052799701690674, 0.00038528579170815647],
    ("dmd2-multistep-lora", "3.5"): [0.000956936739385128, 2.5237464904785156, 0.001181811443530023],
    ("disback-lora", "3"): [2.222048282623291, 0.0002142590965377167, 2.4213480949401855],
    ("disback-lora", "3.5"): [2.443486452102661, 0.0006907876231707633, 2.5071420669555664],
}


@pytest.mark.parametrize("variant", ["3", "3.5"])
@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_every_method_trains_on_flow_transformers(case, variant, sd3, sd35, caption_folder, tmp_path):
    teacher = sd3 if variant == "3" else sd35
    tr = trainer(teacher, caption_folder, tmp_path / "o", **{"max_train_steps": 3, **FLOW_CASES[case]})
    tr.start()
    before = {n: [p.detach().clone() for p in ps] for n, ps in tr.params.items()}
    losses = [tr.step()["loss"] for _ in range(3)]
    assert all(np.isfinite(losses))
    for name, ps in tr.params.items():  # every trainable group took a step
        assert any(not torch.equal(a, p) for a, p in zip(before[name], ps)), name
    assert losses == pytest.approx(RECORDED[(case, variant)], rel=1e-4)


def _vanilla_vs_sample(out: Path, teacher: Path, lora: bool, tmp_path: Path, seed: int = 3) -> float:
    """Max |vanilla StableDiffusion3Pipeline − `fewstep sample`| per pixel, at the folder's recommended
    steps, guidance and timesteps; the vanilla pipeline loaded as the model card says."""
    import json

    import diffusers
    from diffusers import StableDiffusion3Pipeline
    from PIL import Image

    hints = json.loads((out / "fewstep_sampling.json").read_text())
    sched_cls = getattr(diffusers, json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"])
    if lora:
        pipe = StableDiffusion3Pipeline.from_pretrained(teacher, **NO_T5)
        pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
        pipe.scheduler = sched_cls.from_pretrained(str(out), subfolder="scheduler")
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(out, **NO_T5)
    assert isinstance(pipe.scheduler, sched_cls)
    extra = {}
    if "timesteps" in hints:  # the card's explicit grid, as sigmas for a flow scheduler
        from fewstep.models.bundle import load_bundle

        extra = load_bundle(str(teacher), weights=False).timestep_kwargs(32, 32, hints["timesteps"])
    extra.update(hints.get("pipeline_kwargs", {}))  # e.g. the teacher's max_sequence_length
    torch.manual_seed(seed)  # SD3's pipeline re-noises multistep LCM samples from the global RNG
    ref = pipe(PROMPT, num_inference_steps=hints["num_inference_steps"], guidance_scale=hints["guidance_scale"],
               height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(seed), **extra).images[0]
    png = tmp_path / "ours.png"
    assert main(["sample", "--model", str(out), "--prompt", PROMPT, "--seed", str(seed), "--output", str(png)]) == 0
    ours = np.asarray(Image.open(png)).astype(np.float32) / 255
    assert ref.std() > 0
    return float(np.abs(ours - ref).max())


EXPORTS = {
    "lcm": dict(method="lcm"),
    "lcm-lora": dict(method="lcm", lora_rank=4),
    "dmd2-one-step-t399": dict(method="dmd2", dfake_gen_update_ratio=1, conditioning_timestep=399),
    "dmd2-2-step": dict(method="dmd2", dfake_gen_update_ratio=1, num_denoising_step=2),
    "direct-lora": dict(method="direct", lora_rank=4),
}


@pytest.fixture(scope="module")
def sd3_rows(sd3, tmp_path_factory) -> Path:
    from fewstep.generate import generate

    out = tmp_path_factory.mktemp("flow") / "rows"
    generate(str(sd3), str(out), [PROMPT, "a photo of a cat"], teacher_steps=4, teacher_guidance_scale=3.0,
             student_steps=2, images_per_prompt=2, seed=3, save_latents=True, progress=False)
    return out


@pytest.mark.parametrize("case", list(EXPORTS))
def test_exports_sample_in_vanilla_sd3_pipeline_like_fewstep_sample(case, sd3, caption_folder, sd3_rows, tmp_path):
    kw = EXPORTS[case]
    data = sd3_rows if kw["method"] == "direct" else caption_folder
    out = tmp_path / "run"
    assert main(["distill"] + run_args(sd3, data, out, **{"max_train_steps": 2, "learning_rate": 1e-3, **kw})) == 0
    assert _vanilla_vs_sample(out, sd3, "lora_rank" in kw, tmp_path) <= 1 / 255 + 1e-6
    # the model card's code block runs as written
    code = card_snippet(out)
    assert "text_encoder_3=None" in code
    exec(compile(code, "card", "exec"), {})


def test_transformer_lora_files_load_in_diffusers_and_fuse(sd3, sd3_rows, tmp_path):
    """pytorch_lora_weights.safetensors holds transformer keys that load_lora_weights loads to exactly the
    trained adapters; `fewstep export --fuse` merges them into a plain pipeline folder with the same output."""
    from diffusers import StableDiffusion3Pipeline
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["distill"] + run_args(sd3, sd3_rows, out, method="direct", lora_rank=4, max_train_steps=2,
                                       learning_rate=1e-2)) == 0
    sd = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert sd and all(k.startswith("transformer.") for k in sd)
    assert not (out / "pytorch_lora_weights_kohya.safetensors").exists()  # SD3 has no kohya layout here
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)  # trained (B starts at 0)
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3, **NO_T5)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
    loaded = {n: p for n, p in pipe.transformer.named_parameters() if "lora_B" in n}
    assert loaded and any(p.abs().sum() > 0 for p in loaded.values())
    fused = tmp_path / "fused"
    assert main(["export", "--model", str(out), "--fuse", "--output_dir", str(fused)]) == 0
    assert _vanilla_vs_sample(fused, sd3, False, tmp_path) <= 1 / 255 + 1e-6


def test_gan_head_reads_the_transformer_middle_block(sd3, caption_folder, tmp_path):
    tr = trainer(sd3, caption_folder, tmp_path / "o", method="dmd2", gen_cls_loss_weight=5e-3,
                 guidance_cls_loss_weight=1e-2)
    m = tr.method
    fake = m._guidance()
    seen = []
    m.bundle.feature_tap(fake.unet).attach(lambda f: seen.append(f.shape))
    x = torch.randn(2, 4, 8, 8)
    cond = m.bundle.encode_text(["a", "b"])
    logits = m._logits(fake, x, cond)
    inner = fake.unet.config.num_attention_heads * fake.unet.config.attention_head_dim
    assert seen == [(2, inner, 4, 4)] and logits.shape == (2,)  # the 8×8 latent in 2×2 patches
    m.fake_score(x, torch.tensor([500.0, 500.0]), cond)  # a plain forward keeps no features
    assert fake._feat is None


def test_a_flow_teacher_trains_from_scratch_and_loads_in_vanilla_diffusers(tmp_path):
    """`fewstep train-teacher` with an SD3-architecture preset reusing a trained VAE: flow-matching
    steps, then a StableDiffusion3Pipeline folder whose card (with its recorded max_sequence_length)
    runs as written and samples like `fewstep sample`."""
    import json

    from fewstep.testing import build_tiny_sd, write_caption_folder

    vae_donor = build_tiny_sd(tmp_path / "donor")
    data = write_caption_folder(tmp_path / "data", n=8, size=32)
    out = tmp_path / "teacher"
    args = ["--teacher_preset", "tiny-flow", "--teacher_vae", str(vae_donor), "--train_data_dir", str(data),
            "--output_dir", str(out), "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", "3",
            "--learning_rate", "1e-3", "--validation_steps", "0", "--report_to", "none", "--teacher_inference_steps",
            "4", "--teacher_guidance_scale", "2.0"]
    assert main(["train-teacher", *args]) == 0
    hints = json.loads((out / "fewstep_sampling.json").read_text())
    assert hints["pipeline_kwargs"] == {"max_sequence_length": 16}
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "FlowMatchEulerDiscreteScheduler"
    code = card_snippet(out)
    assert "max_sequence_length=16" in code
    exec(compile(code, "card", "exec"), {})
    assert _vanilla_vs_sample(out, out, False, tmp_path) <= 1 / 255 + 1e-6
    # the VAE is the donor's, untouched
    from safetensors.torch import load_file

    a = load_file(str(vae_donor / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_teacher_on_a_reused_vae_trains_from_its_cache(tmp_path):
    """`fewstep cache` of the VAE's own teacher feeds a from-scratch teacher that reuses that VAE: the first
    loss equals the one computed from the images (the posterior is sampled the same way), and a cache
    made by another teacher is refused naming --teacher_vae."""
    from fewstep.testing import build_tiny_sd, write_caption_folder

    donor = build_tiny_sd(tmp_path / "donor")
    data = write_caption_folder(tmp_path / "data", n=8, size=32)
    cache = tmp_path / "cache"
    assert main(["cache", "--pretrained_teacher_model", str(donor), "--train_data_dir", str(data), "--resolution",
                 "32", "--center_crop", "--train_batch_size", "4", "--report_to", "none",
                 "--output_dir", str(cache)]) == 0
    common = ["--method", "teacher", "--teacher_preset", "tiny-flow", "--teacher_vae", str(donor), "--resolution", "32",
              "--center_crop", "--train_batch_size", "4", "--max_train_steps", "2", "--validation_steps", "0",
              "--report_to", "none"]
    losses = []
    for source in (["--train_data_dir", str(data)], ["--cache_dir", str(cache)]):
        tr = Trainer(parse_run([*common, *source, "--output_dir", str(tmp_path / source[0][2:])]))
        tr.start()
        losses.append(tr.step()["loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    other = build_tiny_sd(tmp_path / "other", seed=1)
    code = main(["distill", *common, "--cache_dir", str(cache), "--output_dir", str(tmp_path / "x")])
    assert code == 0  # the cache's own teacher: accepted
    assert main(["distill", *[a if a != str(donor) else str(other) for a in common], "--cache_dir", str(cache),
                 "--output_dir", str(tmp_path / "y")]) == 2
