"""SDXL family: conditioning as StableDiffusionXLPipeline builds it, LCD full and LCM-LoRA, exports
that vanilla StableDiffusionXLPipeline + LCMScheduler runs to the same pixels."""

import numpy as np
import pytest
import torch

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.models.bundle import load_bundle
from fewstep.training.trainer import Trainer


def test_conditioning_matches_the_sdxl_pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    b = load_bundle(str(tiny_sdxl))
    assert b.family == "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pe, npe, pooled, npooled = pipe.encode_prompt("a handwritten digit two", device="cpu",
                                                  do_classifier_free_guidance=True)
    c = b.encode_text(["a handwritten digit two"], size=(32, 48))
    u = b.uncond(1, size=(32, 48))
    assert torch.allclose(c["encoder_hidden_states"], pe, atol=1e-6) and torch.allclose(c["text_embeds"], pooled)
    assert torch.equal(u["encoder_hidden_states"], npe) and torch.equal(u["text_embeds"], npooled)  # zeros
    assert c["time_ids"].tolist() == [[32, 48, 0, 0, 32, 48]]  # (height, width) order

    # real original size and crop from the data, unless --use_fix_crop_and_size
    batch = {"caption": ["a", "b"], "pixel_values": torch.zeros(2, 3, 32, 32),
             "original_size": torch.tensor([[100, 60], [40, 50]]), "crop_top_left": torch.tensor([[3, 0], [0, 7]])}
    _, cond = b.encode_batch(batch)
    assert cond["time_ids"].tolist() == [[100, 60, 3, 0, 32, 32], [40, 50, 0, 7, 32, 32]]
    b.use_fix_crop_and_size = True
    _, cond = b.encode_batch(batch)
    assert cond["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2


def test_fp16_keeps_the_stock_sdxl_vae_in_fp32(tiny_sdxl, tmp_path):
    b = load_bundle(str(tiny_sdxl)).to("cpu", dtype=torch.float16, denoiser_dtype=torch.float16)
    assert b.vae.dtype == torch.float32 and b.text_encoder_2.dtype == torch.float16
    b2 = load_bundle(str(tiny_sdxl), vae_path=str(tiny_sdxl / "vae")).to("cpu", dtype=torch.float16)
    assert b2.vae.dtype == torch.float16  # a separately given VAE is taken as fp16-safe


@pytest.mark.parametrize("lora", [False, True])
def test_lcd_on_sdxl_exports_to_vanilla_pipeline(lora, tiny_sdxl, caption_folder, tmp_path):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from fewstep.diffusion.sampling import sample_images

    out = tmp_path / "out"
    extra = dict(lora_rank=4, learning_rate=1e-2) if lora else {}
    tr = Trainer(parse_run(run_args(tiny_sdxl, caption_folder, out, max_train_steps=2, **extra)))
    tr.start()
    losses = [tr.step()["loss"] for _ in range(2)]
    assert all(np.isfinite(v) and v > 0 for v in losses)
    tr.acc.wait_for_everyone()
    tr.method.export(out)
    prompt, gs = "a handwritten digit four", (1.0 if lora else 6.0)
    if lora:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
        pipe.load_lora_weights(str(out))
    else:
        unet = UNet2DConditionModel.from_pretrained(out / "unet")
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, unet=unet)
    pipe.scheduler = LCMScheduler.from_pretrained(out / "scheduler")
    ref = pipe(prompt, num_inference_steps=2, guidance_scale=gs, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(1)).images[0]
    b = tr.bundle
    ours = sample_images(b, tr.acc.unwrap_model(tr.method.student), LCMScheduler.from_pretrained(out / "scheduler"),
                         [prompt], [1], 2, gs, 32, 32)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() < 1e-4
    assert ref.std() > 0


def test_sdxl_dry_run(tiny_sdxl, caption_folder, tmp_path, capsys):
    assert main(["distill", *run_args(tiny_sdxl, caption_folder, tmp_path / "o"), "--dry_run"]) == 0
    assert "dry run OK" in capsys.readouterr().out


def test_transform_reports_original_size_and_crop():
    from PIL import Image

    from fewstep.data.transforms import ImageTransform

    im = Image.new("RGB", (60, 40))  # width 60, height 40
    out = ImageTransform(32, center_crop=True).apply(im, torch.Generator().manual_seed(0))
    assert out["original_size"].tolist() == [40, 60]  # (height, width)
    assert out["crop_top_left"].tolist() == [0, (48 - 32) // 2]  # resized to 32×48, centred crop
    assert out["pixel_values"].shape == (3, 32, 32)


def _cfg_time_ids(tr) -> list:
    """The time ids of the teacher's CFG batch (cond ‖ uncond, 2B rows) in one LCD loss."""
    seen = []
    unet = tr.bundle.denoiser

    def grab(module, args, kwargs):
        ids = kwargs["added_cond_kwargs"]["time_ids"]
        if ids.shape[0] == 2 * tr.cfg.train_batch_size:
            seen.append(ids.tolist())

    handle = unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        tr.method.loss("student", tr._next_batch(), 0)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("fix,res", [(False, 32), (True, 16)])
def test_lcd_uncond_pass_carries_the_cond_time_ids(lora, fix, res, tiny_sdxl, caption_folder, tmp_path):
    """Issue 15 item 1: the teacher's unconditional half gets the conditional half's time ids (each image's
    original size and crop, or (res, res, 0, 0, res, res) with --use_fix_crop_and_size at any resolution),
    as diffusers' SDXL LCD scripts and StableDiffusionXLPipeline do; before, it got the UNet's default size."""
    extra = dict(lora_rank=4) if lora else {}
    if fix:
        extra["use_fix_crop_and_size"] = True
    tr = Trainer(parse_run(run_args(tiny_sdxl, caption_folder, tmp_path / "o", resolution=res, **extra)))
    tr.start()
    ids = _cfg_time_ids(tr)
    B = tr.cfg.train_batch_size
    cond, uncond = ids[:B], ids[B:]
    assert uncond == cond
    if fix:
        assert cond == [[16, 16, 0, 0, 16, 16]] * B
    else:
        assert all(row[:2] == [40, 40] and row[4:] == [32, 32] for row in cond)  # the 40 px originals


@pytest.mark.parametrize("method", ["dmd2", "disback"])
def test_gan_real_and_fake_samples_carry_the_same_time_ids(method, tiny_sdxl, caption_folder, tmp_path):
    """Issue 15 item 2: the discriminator sees real latents and generator samples under the same SDXL
    time ids, DMD2's fixed (res, res, 0, 0, res, res), not each real image's original size (40 px here)."""
    extra = dict(degradation_steps=1, degradation_interval=1, max_train_steps=4) if method == "disback" else {}
    tr = Trainer(parse_run(run_args(tiny_sdxl, caption_folder, tmp_path / "o", method=method, dfake_gen_update_ratio=1,
                                    fake_score_lora_rank=4, gen_cls_loss_weight=5e-3, guidance_cls_loss_weight=1e-2,
                                    **extra)))
    tr.start()
    m = tr.method
    if method == "disback":
        tr.step()  # stage 1 (no GAN) → stage 2 begins
    seen = []
    real_logits = m._logits

    def logits(net, x, cond):
        seen.append(cond["time_ids"].tolist())
        return real_logits(net, x, cond)

    m._logits = logits
    batch = tr._next_batch()
    out = m.guidance_loss(batch, m._cond(batch), 2)
    assert "guidance_cls_loss" in out.logs
    assert seen == [[[32, 32, 0, 0, 32, 32]] * 2] * 2  # fake, then real
