"""Qwen-Image (QwenImagePipeline) on a tiny teacher built from configs: the family reproduces the vanilla
pipeline piece by piece (prompt template and masks, 5-D latents with per-channel statistics, 2×2 packing,
dynamic shift and its σ grid, true CFG with the norm rescaling), LCD against an independent true-CFG
reference, direct distillation against the vanilla pipeline's own K-step sampler, every method's recorded
losses, exports that vanilla QwenImagePipeline samples like `fewstep sample`, LoRA files in diffusers'
and DiffSynth-Studio's layouts (read back through diffusers' Qwen converter), resume, and training from a
`fewstep cache` without the text encoder, and the --dry_run memory plan (training/memory.py)."""

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import card_snippet, run_args
from fewstep.cli import main, parse_run
from fewstep.config import ConfigError
from fewstep.training.trainer import Trainer

PROMPT = "a handwritten digit seven"
ROW_PROMPTS = [PROMPT, "a photo of a cat"]
TEACHER_STEPS, TEACHER_W, STUDENT_STEPS = 4, 3.0, 2


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    from fewstep.testing import build_tiny_qwenimage

    return build_tiny_qwenimage(tmp_path_factory.mktemp("qwen") / "teacher")


@pytest.fixture(scope="module")
def qwen_rows(qwen, tmp_path_factory) -> Path:
    """DiffSynth rows from the teacher (true CFG 3 over 4 steps) for a 2-step student at CFG 1."""
    from fewstep.generate import generate

    out = tmp_path_factory.mktemp("qwen") / "rows"
    generate(str(qwen), str(out), ROW_PROMPTS, teacher_steps=TEACHER_STEPS, teacher_guidance_scale=TEACHER_W,
             student_steps=STUDENT_STEPS, images_per_prompt=2, seed=3, save_latents=True, resolution=32,
             progress=False)
    return out


@pytest.fixture(scope="module")
def pipe(qwen):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(qwen)


def trainer(teacher, data, out, **kw) -> Trainer:
    return Trainer(parse_run(run_args(teacher, data, out, **{"learning_rate": 1e-3, **kw})))


def _velocity(net, z, sigma, embeds, mask=None):
    """The transformer's velocity for (B, C, h, w) latents, packed and unpacked by the pipeline's own code."""
    from diffusers import QwenImagePipeline

    B, C, h, w = z.shape
    packed = QwenImagePipeline._pack_latents(z, B, C, h, w)
    out = net(hidden_states=packed, timestep=torch.full((B,), float(sigma)), encoder_hidden_states=embeds,
              encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * B, return_dict=False)[0]
    return QwenImagePipeline._unpack_latents(out, h * 4, w * 4, 4)[:, :, 0]  # (pixel size, VAE factor 4)


def _true_cfg(v_c, v_u, s):
    """QwenImagePipeline's guidance, written out on packed tokens: combine, then rescale each token."""
    from diffusers import QwenImagePipeline

    B, C, h, w = v_c.shape
    c, u = (QwenImagePipeline._pack_latents(v, B, C, h, w) for v in (v_c, v_u))
    comb = u + s * (c - u)
    comb = comb * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
    return QwenImagePipeline._unpack_latents(comb, h * 4, w * 4, 4)[:, :, 0]


# ---- the family against the vanilla pipeline ------------------------------------------------------

def test_offline_tokenizer_loads_as_qwen2_and_keeps_the_templates_prefix(qwen, pipe):
    """The tokenizer written offline loads in Qwen2Tokenizer and Qwen2TokenizerFast alike, and the
    pipeline's template prefix is exactly the 34 tokens the pipeline drops."""
    from transformers import Qwen2Tokenizer, Qwen2TokenizerFast

    from fewstep.testing import QWEN_TEMPLATE

    text = QWEN_TEMPLATE.format(PROMPT)
    a = Qwen2Tokenizer.from_pretrained(str(qwen / "tokenizer"))(text).input_ids
    b = Qwen2TokenizerFast.from_pretrained(str(qwen / "tokenizer"))(text).input_ids
    assert a == b
    prefix = pipe.tokenizer(QWEN_TEMPLATE.split("{}")[0]).input_ids
    assert len(prefix) == pipe.prompt_template_encode_start_idx == 34
    assert a[:34] == prefix
    embeds, mask = pipe.encode_prompt([PROMPT], device="cpu")
    assert embeds.shape[1] == len(a) - 34 and mask is None  # the prompt and the assistant suffix remain


def test_family_reproduces_the_pipeline_piece_by_piece(qwen, pipe):
    """Conditioning, shift, latents, packing, true CFG and the whole sampler equal QwenImagePipeline's."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    from fewstep.diffusion.sampling import sample_images
    from fewstep.models.bundle import load_bundle

    b = load_bundle(str(qwen))
    assert type(b).__name__ == "QwenImageBundle" and b.latent_shape(32, 32) == (4, 8, 8)
    # text: the pipeline's batched embeddings and mask, zero-padded to 512
    prompts = ["a cat", PROMPT]
    ref_e, ref_m = pipe.encode_prompt(prompts, device="cpu")
    cond = b.encode_text(prompts)
    n = ref_e.shape[1]
    assert cond["encoder_hidden_states"].shape == (2, 512, 32)
    assert torch.equal(cond["encoder_hidden_states"][:, :n], ref_e)
    assert torch.equal(cond["encoder_hidden_states_mask"][:, :n], ref_m.float())
    assert not cond["encoder_hidden_states"][:, n:].any() and not cond["encoder_hidden_states_mask"][:, n:].any()
    # dynamic shift: the pipeline's μ for 4×4 packed tokens
    cfg = pipe.scheduler.config
    assert b.shift_mu(32, 32) == calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                                                 cfg.max_shift)
    assert b.schedule_for(32, 32).shift == pytest.approx(np.exp(b.shift_mu(32, 32)))
    # latents: img2img's normalisation of the VAE mode, and the pipeline's decode
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = b.encode_images(x, sample=False)
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(pipe.vae.config.latents_std).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        ref_z = ((pipe.vae.encode(x[:, :, None]).latent_dist.mode() - mean) * (1.0 / std))[:, :, 0]
        ref_x = pipe.vae.decode(z[:, :, None] / (1.0 / std) + mean).sample[:, :, 0]
    assert torch.equal(z, ref_z)
    assert torch.equal(b.decode(z), (ref_x / 2 + 0.5).clamp(0, 1))
    # the denoiser: a batch of two prompts of different lengths through the pipeline's packing
    zt = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ref_v = _velocity(b.denoiser, zt, 0.7, ref_e, ref_m)
    assert torch.equal(b.denoise(b.denoiser, zt, torch.tensor(700.0), cond), ref_v)
    # true CFG with the rescaling
    v_c, v_u = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(b.guide(v_c, v_u, 3.0), _true_cfg(v_c, v_u, 3.0))
    # the sampler: the pipeline's σ grid, shift, terminal stretch, negative prompt and CFG, two prompts
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    for steps, scale in ((3, 3.0), (2, 1.0)):
        sched = FlowMatchEulerDiscreteScheduler.from_config(b.scheduler_config)
        ours = sample_images(b, b.denoiser, sched, prompts, [5, 6], steps, scale, 32, 32)
        ref = pipe(prompts, height=32, width=32, num_inference_steps=steps, output_type="pt",
                   generator=[g.manual_seed(s) for g, s in zip(gens, (5, 6))], **b.guidance_call_kwargs(scale)).images
        # (equal bit for bit on one thread; the pipeline's unbatched negative prompt blocks its matmuls
        # differently on several)
        assert ref.std() > 0 and (ours - ref).abs().max() < 1e-5, (steps, scale, (ours - ref).abs().max())


def test_lcd_loss_equals_a_true_cfg_reference(qwen, pipe, caption_folder, tmp_path):
    """LCD on Qwen-Image recomputed one sample at a time from the pipeline's pieces: the shifted training σ,
    the transformer's velocity on packed tokens, the pipeline's true CFG at 1 + w with its rescaling (no
    mask: single prompts), one Euler step, and f = z − σ v̂ for student and EMA target. The method batches
    prompts of different lengths and cond with uncond, padded and masked."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    tr = trainer(qwen, caption_folder, tmp_path / "o", w_min=2.0, w_max=4.0)
    tr.start()
    batch = tr._next_batch()
    m, b = tr.method, tr.bundle
    torch.manual_seed(7)
    loss = m.loss("student", batch, 0).loss.item()

    torch.manual_seed(7)  # the method's draws, in its order
    x0 = b.encode_images(batch["pixel_values"])
    B = x0.shape[0]
    n = torch.randint(0, 50, (B,))
    eps = torch.randn_like(x0)
    w = 2.0 + 2.0 * torch.rand(B)
    cfg = pipe.scheduler.config
    mu = calculate_shift(16, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift, cfg.max_shift)
    sig = pipe.scheduler.time_shift(mu, 1.0, torch.arange(1, 1001, dtype=torch.float64) / 1000).float()
    expected = 0.0
    with torch.no_grad():
        unc, _ = pipe.encode_prompt([""], device="cpu")
        for i in range(B):
            c, _ = pipe.encode_prompt([batch["caption"][i]], device="cpu")
            s_i = (int(n[i]) + 1) * 20 - 1
            sigma_s = sig[s_i].item()
            sigma_t = sig[s_i - 20].item() if s_i >= 20 else 0.0
            z_s = sigma_s * eps[i:i + 1] + (1 - sigma_s) * x0[i:i + 1]
            f = z_s - sigma_s * _velocity(m.student, z_s, sigma_s, c)
            v_g = _true_cfg(_velocity(b.denoiser, z_s, sigma_s, c), _velocity(b.denoiser, z_s, sigma_s, unc), 1 + w[i])
            z_t = z_s + (sigma_t - sigma_s) * v_g
            target = z_t - sigma_t * _velocity(m.target, z_t, sigma_t, c)
            expected += torch.mean((f - target) ** 2).item() / B
    assert loss == pytest.approx(expected, rel=1e-4)


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_generate_writes_diffsynth_rows_equal_to_the_vanilla_pipeline(qwen, qwen_rows, pipe):
    """`fewstep generate` on Qwen-Image: DiffSynth's columns, and each row's latents are what vanilla
    QwenImagePipeline makes at the teacher's steps with true CFG (negative prompt "") from (seed, rand_device)."""
    from safetensors.torch import load_file

    rows = _rows(qwen_rows / "metadata.csv")
    assert list(rows[0]) == ["image", "prompt", "seed", "rand_device", "num_inference_steps", "cfg_scale", "latents"]
    assert [(r["prompt"], r["num_inference_steps"], r["cfg_scale"]) for r in rows] == \
        [(p, str(STUDENT_STEPS), "1.0") for p in ROW_PROMPTS for _ in range(2)]
    r = rows[2]
    packed = pipe(r["prompt"], negative_prompt="", true_cfg_scale=TEACHER_W, num_inference_steps=TEACHER_STEPS,
                  height=32, width=32, output_type="latent",
                  generator=torch.Generator(r["rand_device"]).manual_seed(int(r["seed"]))).images
    ref = pipe._unpack_latents(packed, 32, 32, 4)[:, :, 0]
    assert (load_file(str(qwen_rows / r["latents"]))["latents"] - ref[0]).abs().max() < 1e-5  # (batched rows)


def test_direct_loss_equals_the_vanilla_pipelines_k_step_output(qwen, qwen_rows, pipe, tmp_path):
    """Direct distillation's student sampler is the pipeline's: its 'final' loss at step 0 is the MSE
    between vanilla QwenImagePipeline at the rows' 2 steps (flow Euler, dynamic shift, σ grid, terminal
    stretch) from each row's noise and the teacher's saved latents."""
    from safetensors.torch import load_file

    tr = trainer(qwen, qwen_rows, tmp_path / "o", method="direct", max_train_steps=1, train_batch_size=4)
    tr.start()
    batch = tr._next_batch()
    loss = float(tr.method.loss("student", batch, 0).loss)
    sq = []
    for lat_path, prompt, seed in zip(batch["meta"]["latents"], batch["caption"], batch["meta"]["seed"]):
        packed = pipe(prompt, num_inference_steps=STUDENT_STEPS, true_cfg_scale=1.0, height=32, width=32,
                      output_type="latent", generator=torch.Generator().manual_seed(int(seed))).images
        lat = pipe._unpack_latents(packed, 32, 32, 4)[0, :, 0]
        sq.append((lat - load_file(str(qwen_rows / lat_path))["latents"]) ** 2)
    assert loss == pytest.approx(float(torch.stack(sq).mean()), rel=1e-4)


def test_one_step_direct_on_a_terminal_stretched_schedule_is_refused(qwen, qwen_rows, tmp_path):
    tr = trainer(qwen, qwen_rows, tmp_path / "o", method="direct", student_steps=1, max_train_steps=1)
    tr.start()
    with pytest.raises(ConfigError, match="shift_terminal=0.02.*no finite 1-step grid"):
        tr.method.loss("student", tr._next_batch(), 0)


# ---- every method, recorded ---------------------------------------------------------------------

# Recorded on CPU (torch 2.13, diffusers 0.42, transformers 5.24), seed 0, batch 2, lr 1e-3: 3 steps.
CASES = {
    "lcm": dict(method="lcm"),
    "lcm-lora-ema": dict(method="lcm", lora_rank=4, ema_decay=0.9),
    "dmd2-gan": dict(method="dmd2", dfake_gen_update_ratio=1, gen_cls_loss_weight=5e-3, guidance_cls_loss_weight=1e-2,
                     real_guidance_scale=2.0),
    "dmd2-multistep-lora": dict(method="dmd2", dfake_gen_update_ratio=1, num_denoising_step=4,
                                backward_simulation=True, fake_score_lora_rank=4),
    "disback-lora": dict(method="disback", dfake_gen_update_ratio=1, fake_score_lora_rank=4, degradation_steps=1,
                         degradation_interval=1, interval=1, max_train_steps=6),
    "direct": dict(method="direct"),
    "direct-lora-true-cfg": dict(method="direct", lora_rank=4, student_guidance_scale=2.0),
}
RECORDED = {
    "lcm": [0.000284604262560606, 0.0006364170694723725, 0.0019476369488984346],
    "lcm-lora-ema": [0.0003364288713783026, 0.0005648007499985397, 0.00034993296139873564],
    # (re-recorded with issue 15's DMD2 GAN head, the default since: strided convs down to 1×1)
    "dmd2-gan": [0.0039589544758200645, 2.202247142791748, 0.004167033825069666],
    "dmd2-multistep-lora": [5.433575279312208e-05, 2.2601261138916016, 4.8093890654854476e-05],
    "disback-lora": [2.063087224960327, 1.1562478903215379e-05, 1.9510960578918457],
    "direct": [0.011361993849277496, 0.009399602189660072, 0.005751770455390215],
    "direct-lora-true-cfg": [0.01106493640691042, 0.011715887114405632, 0.0104756448417902],
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_method_trains_on_qwen_image(case, qwen, qwen_rows, caption_folder, tmp_path):
    data = qwen_rows if CASES[case]["method"] == "direct" else caption_folder
    tr = trainer(qwen, data, tmp_path / "o", **{"max_train_steps": 3, **CASES[case]})
    tr.start()
    before = {n: [p.detach().clone() for p in ps] for n, ps in tr.params.items()}
    losses = [tr.step()["loss"] for _ in range(3)]
    assert all(np.isfinite(losses))
    for name, ps in tr.params.items():  # every trainable group took a step
        assert any(not torch.equal(a, p) for a, p in zip(before[name], ps)), name
    assert losses == pytest.approx(RECORDED[case], rel=1e-4), f"{case}: {losses!r}"


def test_gan_head_reads_the_middle_dual_stream_block(qwen, caption_folder, tmp_path):
    tr = trainer(qwen, caption_folder, tmp_path / "o", method="dmd2", gen_cls_loss_weight=5e-3,
                 guidance_cls_loss_weight=1e-2)
    m = tr.method
    fake = m._guidance()
    seen = []
    m.bundle.feature_tap(fake.unet).attach(lambda f: seen.append(f.shape))
    x = torch.randn(2, 4, 8, 8)
    cond = m.bundle.encode_text(["a", "b"])
    logits = m._logits(fake, x, cond)
    assert seen == [(2, 32, 4, 4)] and logits.shape == (2,)  # 8×8 latents in 2×2 patches, width 32
    m.fake_score(x, torch.tensor([500.0, 500.0]), cond)  # a plain forward keeps no features
    assert fake._feat is None


# ---- exports in vanilla QwenImagePipeline -------------------------------------------------------

def _vanilla_vs_sample(out: Path, teacher: Path, lora: bool, tmp_path: Path, seed: int = 3) -> float:
    """Max |vanilla QwenImagePipeline − `fewstep sample`| per pixel at 32 px, at the folder's recommended
    steps, guidance and timesteps."""
    import json

    import diffusers
    from diffusers import QwenImagePipeline
    from PIL import Image

    from fewstep.models.bundle import load_bundle

    hints = json.loads((out / "fewstep_sampling.json").read_text())
    sched_cls = getattr(diffusers, json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"])
    if lora:
        vanilla = QwenImagePipeline.from_pretrained(teacher)
        vanilla.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")
        vanilla.scheduler = sched_cls.from_pretrained(str(out), subfolder="scheduler")
    else:
        vanilla = QwenImagePipeline.from_pretrained(out)
    assert isinstance(vanilla.scheduler, sched_cls)
    light = load_bundle(str(teacher), weights=False)
    extra = dict(hints.get("pipeline_kwargs", {}))  # the run's pipeline-call arguments, its true CFG's among them
    assert extra.items() >= light.guidance_call_kwargs(hints["guidance_scale"]).items()
    if "timesteps" in hints:  # the card's explicit grid, as sigmas
        extra.update({k: v for k, v in light.timestep_kwargs(32, 32, hints["timesteps"]).items() if k != "mu"})
    torch.manual_seed(seed)  # the pipeline re-noises multistep LCM samples from the global RNG
    ref = vanilla(PROMPT, num_inference_steps=hints["num_inference_steps"], height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(seed), **extra).images[0]
    png = tmp_path / "ours.png"
    assert main(["sample", "--model", str(out), "--prompt", PROMPT, "--seed", str(seed), "--resolution", "32",
                 "--output", str(png)]) == 0
    ours = np.asarray(Image.open(png)).astype(np.float32) / 255
    assert ref.std() > 0
    return float(np.abs(ours - ref).max())


EXPORTS = {
    "lcm": dict(method="lcm"),
    "lcm-lora": dict(method="lcm", lora_rank=4),
    "dmd2-one-step-t399": dict(method="dmd2", dfake_gen_update_ratio=1, conditioning_timestep=399),
    "dmd2-2-step": dict(method="dmd2", dfake_gen_update_ratio=1, num_denoising_step=2),
    "disback": dict(method="disback", dfake_gen_update_ratio=1, degradation_steps=1, degradation_interval=1,
                    interval=1),
    "direct": dict(method="direct"),
    "direct-lora": dict(method="direct", lora_rank=4),
}
CARD_RUNS = {"lcm-lora", "direct"}  # the card's code at the pipeline's default 512 px: two are enough


@pytest.mark.parametrize("case", list(EXPORTS))
def test_exports_sample_in_vanilla_qwenimage_pipeline_like_fewstep_sample(case, qwen, caption_folder, qwen_rows,
                                                                           tmp_path):
    kw = EXPORTS[case]
    data = qwen_rows if kw["method"] == "direct" else caption_folder
    out = tmp_path / "run"
    assert main(["distill"] + run_args(qwen, data, out, **{"max_train_steps": 2, "learning_rate": 1e-3, **kw})) == 0
    assert _vanilla_vs_sample(out, qwen, "lora_rank" in kw, tmp_path) <= 1 / 255 + 1e-6
    code = card_snippet(out)
    assert "true_cfg_scale=" in code and "guidance_scale=" not in code.replace("true_cfg_scale=", "")
    if case in CARD_RUNS:  # the model card's code block runs as written
        exec(compile(code, "card", "exec"), {})


# ---- LoRA files ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def direct_lora(qwen, qwen_rows, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen") / "direct-lora"
    assert main(["distill"] + run_args(qwen, qwen_rows, out, method="direct", lora_rank=4, max_train_steps=3,
                                       checkpointing_steps=2, learning_rate=1e-2)) == 0
    return out


def test_lora_files_load_in_diffusers_and_through_its_qwen_converter(direct_lora, qwen):
    """pytorch_lora_weights.safetensors loads with load_lora_weights to exactly the trained adapters; the
    DiffSynth-Studio file holds the same weights under DiffSynth's keys, and diffusers' Qwen converter
    (what load_lora_weights applies to it) turns it back into exactly the diffusers file."""
    from diffusers import QwenImagePipeline
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers
    from safetensors.torch import load_file

    from fewstep.models.qwenimage import DIFFSYNTH_FILE, QWEN_LORA_TARGETS

    sd = load_file(str(direct_lora / "pytorch_lora_weights.safetensors"))
    assert sd and all(k.startswith("transformer.") for k in sd)
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k)  # trained (B starts at 0)
    modules = {k.split(".lora_")[0].split(".", 3)[-1] for k in sd}  # "attn.to_q", "img_mod.1", ...
    matched = {t for t in QWEN_LORA_TARGETS for m in modules if m == t or m.endswith("." + t)}
    assert matched == set(QWEN_LORA_TARGETS) and len(modules) == len(QWEN_LORA_TARGETS)  # DiffSynth's modules
    ds = load_file(str(direct_lora / DIFFSYNTH_FILE))
    assert all(k.startswith("transformer_blocks.") and (".lora_A.default." in k or ".lora_B.default." in k)
               for k in ds)
    back = _convert_non_diffusers_qwen_lora_to_diffusers(dict(ds))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    for name in ("pytorch_lora_weights.safetensors", DIFFSYNTH_FILE):
        p = QwenImagePipeline.from_pretrained(qwen)
        p.load_lora_weights(str(direct_lora), weight_name=name, adapter_name="x")
        loaded = {n.replace(".x.", "."): t for n, t in p.transformer.named_parameters() if ".lora_" in n}
        assert {f"transformer.{n}" for n in loaded} == set(sd)
        assert all(torch.equal(t, sd[f"transformer.{n}"]) for n, t in loaded.items()), name


def test_diffsynth_layout_folds_alpha_over_rank_into_b():
    """α ≠ r: DiffSynth's loader applies B·A at scale 1, so the file's B is (α/r)·B, and the product the
    converter hands diffusers equals the adapter's α/r · B·A."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    from fewstep.models.qwenimage import DIFFSYNTH_FILE, QwenImageBundle

    g = torch.Generator().manual_seed(0)
    peft = {"transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
            "transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}
    layout = QwenImageBundle.lora_layouts(None, peft, alpha=12.0)[DIFFSYNTH_FILE]
    back = _convert_non_diffusers_qwen_lora_to_diffusers(dict(layout))
    key = "transformer.transformer_blocks.0.attn.to_q"
    delta = back[f"{key}.lora_B.weight"] @ back[f"{key}.lora_A.weight"]
    want = 3.0 * peft["transformer_blocks.0.attn.to_q.lora_B.weight"] @ peft["transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert torch.allclose(delta, want, rtol=1e-6, atol=1e-6)


def test_lora_fuse_export_and_resume(direct_lora, qwen, qwen_rows, tmp_path):
    """`fewstep export --fuse` gives a plain QwenImagePipeline folder that samples like `fewstep sample`;
    a run cut at its step-2 checkpoint and resumed ends on the same LoRA weights as the straight run."""
    from safetensors.torch import load_file

    fused = tmp_path / "fused"
    assert main(["export", "--model", str(direct_lora), "--fuse", "--output_dir", str(fused)]) == 0
    assert _vanilla_vs_sample(fused, qwen, False, tmp_path) <= 1 / 255 + 1e-6
    cut = tmp_path / "cut"
    args = dict(method="direct", lora_rank=4, checkpointing_steps=2, learning_rate=1e-2)
    assert main(["distill"] + run_args(qwen, qwen_rows, cut, max_train_steps=2, **args)) == 0
    assert main(["distill"] + run_args(qwen, qwen_rows, cut, max_train_steps=3, resume_from_checkpoint="latest",
                                       **args)) == 0
    a = load_file(str(direct_lora / "pytorch_lora_weights.safetensors"))
    b = load_file(str(cut / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- text-encoder memory ------------------------------------------------------------------------

def test_training_from_a_cache_loads_no_text_encoder(qwen, caption_folder, tmp_path):
    """`fewstep cache` stores the Qwen2.5-VL embeddings with their masks; LCD from the cache loads no
    text encoder (nor VAE encoder) and computes the same loss as encoding on the fly."""
    from fewstep.data.cache import CachedDataset

    cache = tmp_path / "cache"
    assert main(["cache", *run_args(qwen, caption_folder, cache, center_crop=True)]) == 0
    item = CachedDataset(str(cache))[0]
    assert item["cached_text.encoder_hidden_states"].shape == (512, 32)
    assert item["cached_text.encoder_hidden_states_mask"].shape == (512,)
    assert item["cached_moments"].shape == (8, 8, 8)  # mean ‖ logvar of 4 channels, the frame axis removed

    def first_loss(args):
        tr = Trainer(parse_run(args))
        tr.start()
        torch.manual_seed(123)  # (loading a text encoder draws from the global RNG)
        return tr, tr.step()["loss"]

    _, on_the_fly = first_loss(run_args(qwen, caption_folder, tmp_path / "a", center_crop=True))
    args = run_args(qwen, caption_folder, tmp_path / "b", center_crop=True)
    i = args.index("--train_data_dir")
    args[i:i + 2] = ["--cache_dir", str(cache)]
    tr, cached = first_loss(args)
    assert tr.bundle.parts["text_encoder"] is None
    assert not any(isinstance(m, torch.nn.Conv3d) for m in tr.bundle.vae.encoder.modules())
    assert cached == pytest.approx(on_the_fly, rel=1e-5)


def test_dry_run_reports_every_network_of_a_qwen_image_run(qwen, caption_folder, tmp_path, capsys):
    """--dry_run's memory plan (training/memory.py) on Qwen-Image: LCD holds student, EMA target, teacher
    (bf16 with --cast_teacher_unet), VAE and the Qwen2.5-VL encoder, counted exactly as the loaded modules;
    from a cache no text encoder; LoRA trains r · (in + out) per adapted layer of DiffSynth's 12 modules."""
    from fewstep.models.bundle import load_bundle
    from fewstep.training.memory import plan

    b = load_bundle(str(qwen))
    n_tr = sum(p.numel() for p in b.denoiser.parameters())
    sizes = {k: sum(p.numel() for p in b.parts[k].parameters()) for k in ("vae", "text_encoder")}
    args = run_args(qwen, caption_folder, tmp_path / "o", mixed_precision="bf16", cast_teacher_unet=True)
    assert main(["distill", *args, "--dry_run"]) == 0
    printed = capsys.readouterr().out
    assert "memory the run holds" in printed and "dry run OK" in printed
    p = plan(parse_run(args))
    held = {h.name: h for h in p.networks}
    assert set(held) == {"student", "target", "teacher", "vae", "text_encoder"}
    assert held["student"].params == held["target"].params == held["teacher"].params == n_tr
    assert held["student"].bytes == 4 * n_tr and held["teacher"].bytes == 2 * n_tr  # fp32 trained, bf16 frozen
    assert p.trainable == n_tr and p.grad_bytes == 4 * n_tr and p.optimizer_bytes == 8 * n_tr
    assert all(held[k].params == v for k, v in sizes.items())

    lora = plan(parse_run(run_args(qwen, caption_folder, tmp_path / "o", lora_rank=4)))
    adapted = [m for n, m in b.denoiser.named_modules() if isinstance(m, torch.nn.Linear)
               and any(n == t or n.endswith("." + t) for t in b.lora_targets)]
    assert len(adapted) == 12 * len(b.denoiser.transformer_blocks)
    assert lora.trainable == sum(4 * (m.in_features + m.out_features) for m in adapted)

    cache = tmp_path / "cache"
    assert main(["cache", *run_args(qwen, caption_folder, cache)]) == 0
    args = run_args(qwen, caption_folder, tmp_path / "o2", method="dmd2", fake_score_lora_rank=4)
    i = args.index("--train_data_dir")
    args[i:i + 2] = ["--cache_dir", str(cache)]
    assert "text_encoder" not in [h.name for h in plan(parse_run(args)).networks]
