"""LCM-LoRA: one UNet (teacher = adapters disabled), adapter-only updates, optional EMA adapter, and
LoRA files that vanilla diffusers loads (diffusers keys, kohya keys, fused)."""

import json

import numpy as np
import pytest
import torch

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.training.trainer import Trainer


def lora_trainer(teacher, data, out, **kw):
    args = dict(lora_rank=4, lora_alpha=8, learning_rate=1e-2, w_min=2.0, w_max=4.0)
    args.update(kw)
    return Trainer(parse_run(run_args(teacher, data, out, **args)))


def test_lora_step_updates_only_adapters_and_teacher_is_the_base(tiny_teacher, caption_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    tr = lora_trainer(tiny_teacher, caption_folder, tmp_path / "o")
    tr.start()
    unet = tr.acc.unwrap_model(tr.method.student)
    assert unet is tr.bundle.denoiser  # one UNet in memory
    assert unet.config.time_cond_proj_dim is None  # no guidance embedding with LoRA
    base = {k: v.clone() for k, v in unet.state_dict().items() if "lora" not in k}
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A.default." in n or ".lora_B.default." in n for n in trainable)
    tr.step()
    tr.step()
    after = unet.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())  # base weights untouched
    lora_b = [p for n, p in unet.named_parameters() if ".lora_B.default." in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # adapters trained (B starts at 0)

    # The teacher pass is exactly the original teacher.
    ref = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 259])
    c = tr.bundle.encode_text(["a photo of a cat", "a handwritten digit one"])
    with torch.no_grad():
        got = tr.method._teacher(z, t, c).raw
        want = ref(z, t, encoder_hidden_states=c["encoder_hidden_states"]).sample
        student = tr.bundle.denoise(unet, z, t, c)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(student, want, atol=1e-4)

    # The exported file, loaded by vanilla diffusers, is this very student.
    tr.method.export(tmp_path / "export")
    pipe = _pipe(tiny_teacher)
    pipe.load_lora_weights(str(tmp_path / "export"))
    with torch.no_grad():
        loaded = pipe.unet(z, t, encoder_hidden_states=c["encoder_hidden_states"]).sample
    assert torch.allclose(loaded, student, atol=1e-5)


def test_ema_adapter(tiny_teacher, caption_folder, tmp_path):
    tr = lora_trainer(tiny_teacher, caption_folder, tmp_path / "o", ema_decay=0.5)
    tr.start()
    unet = tr.acc.unwrap_model(tr.method.student)
    ema0 = [p.detach().clone() for p, _ in tr.method.ema_pairs]
    tr.step()
    for (ema, online), e0 in zip(tr.method.ema_pairs, ema0):
        assert torch.allclose(ema, 0.5 * e0 + 0.5 * online.detach(), atol=1e-7)
        assert not ema.requires_grad
    assert all(".default." in n for n, p in unet.named_parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def lora_run(tiny_teacher, caption_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "out"
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, lora_rank=4, lora_alpha=8,
                                      learning_rate=1e-2, max_train_steps=3)]) == 0
    return out


def _pipe(teacher):
    from diffusers import LCMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(teacher, safety_checker=None)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _run(pipe, prompt="a handwritten digit seven"):
    return pipe(prompt, num_inference_steps=4, guidance_scale=1.0, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(3)).images[0]


def test_lora_files_load_in_vanilla_diffusers(lora_run, tiny_teacher, tmp_path):
    from diffusers import LCMScheduler

    from fewstep.diffusion.sampling import sample_images
    from fewstep.models.bundle import load_bundle

    for f in ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors", "fewstep_lora.json",
              "scheduler/scheduler_config.json", "README.md"):
        assert (lora_run / f).is_file(), f
    base = _run(_pipe(tiny_teacher))

    pipe = _pipe(tiny_teacher)
    pipe.load_lora_weights(str(lora_run))  # diffusers / PEFT keys
    with_lora = _run(pipe)
    assert abs(with_lora - base).max() > 1e-3  # the LoRA does something

    # fewstep's own sampling of the student (LoRA folder → base + fused LoRA) gives the same images.
    bundle = load_bundle(str(lora_run))
    ours = sample_images(bundle, bundle.denoiser, LCMScheduler.from_config(bundle.scheduler_config),
                         ["a handwritten digit seven"], [3], 4, 1.0, 32, 32)[0].permute(1, 2, 0).numpy()
    assert abs(ours - with_lora).max() < 2e-4

    pipe.fuse_lora()
    assert abs(_run(pipe) - with_lora).max() < 2e-4

    kohya = _pipe(tiny_teacher)  # kohya keys (lora_unet_…, .alpha), as WebUI / ComfyUI read them
    kohya.load_lora_weights(str(lora_run), weight_name="pytorch_lora_weights_kohya.safetensors")
    assert abs(_run(kohya) - with_lora).max() < 2e-4


def test_kohya_file_round_trips(lora_run):
    """kohya keys (lora_unet_…, lora_down/lora_up, .alpha = α) convert back, through diffusers' own
    kohya reader, to exactly the trained PEFT weights."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    kohya = load_file(str(lora_run / "pytorch_lora_weights_kohya.safetensors"))
    assert all(k.startswith("lora_unet_") for k in kohya)
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    downs = [k for k in kohya if k.endswith("lora_down.weight")]
    assert len(alphas) == len(downs) > 0 and all(float(a) == 8.0 for a in alphas)  # α, not r

    converted = _convert_non_diffusers_lora_to_diffusers(dict(kohya))
    sd = converted[0] if isinstance(converted, tuple) else converted
    back = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in sd.items()})
    peft = {k[len("unet."):]: v for k, v in load_file(str(lora_run / "pytorch_lora_weights.safetensors")).items()}
    assert back.keys() == peft.keys() and len(back) == len(downs) * 2
    assert all(torch.equal(back[k], peft[k]) for k in peft)


def test_export_fuse_equals_base_plus_lora(lora_run, tiny_teacher, tmp_path):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    out = tmp_path / "fused"
    assert main(["export", "--model", str(lora_run), "--fuse", "--output_dir", str(out)]) == 0
    fused = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    base = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet").state_dict()
    lora = load_file(str(lora_run / "pytorch_lora_weights.safetensors"))
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    A, B = lora[f"unet.{key}.lora_A.weight"], lora[f"unet.{key}.lora_B.weight"]
    expected = base[f"{key}.weight"] + (8 / 4) * B @ A  # W + (α / r) B A
    assert torch.allclose(fused[f"{key}.weight"], expected, atol=1e-5)
    assert not torch.allclose(fused[f"{key}.weight"], base[f"{key}.weight"])
    # and the fused folder is a pipeline vanilla diffusers runs
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"


def test_paddlemix_is_lora_flag(tiny_teacher, caption_folder, tmp_path):
    spec = parse_run(run_args(tiny_teacher, caption_folder, tmp_path) + ["--is_lora", "True"])
    assert spec.method.lora and spec.method.rank == 64 and spec.method.mu is None
    spec = parse_run(run_args(tiny_teacher, caption_folder, tmp_path))
    assert not spec.method.lora and spec.method.mu == 0.95


def test_lora_folder_card_snippet_runs(lora_run, tiny_teacher, tmp_path):
    """A LoRA folder has no model_index.json: its card loads the base model, the adapter and the folder's
    LCMScheduler (the snippet is executed as written)."""
    from diffusers import LCMScheduler

    from conftest import card_snippet
    from fewstep.diffusion.sampling import sample_images
    from fewstep.models.bundle import load_bundle

    code = card_snippet(lora_run)
    assert f'from_pretrained("{tiny_teacher}")' in code and "num_inference_steps=4, guidance_scale=1.0" in code
    ns: dict = {}
    exec(code, ns)
    pipe, image = ns["pipe"], np.asarray(ns["image"])
    assert type(pipe.scheduler) is LCMScheduler
    assert dict(pipe.scheduler.config) == dict(LCMScheduler.from_pretrained(lora_run / "scheduler").config)
    assert image.shape == (32, 32, 3) and image.std() > 0
    bundle = load_bundle(str(lora_run))  # the snippet's pipeline is the student fewstep samples
    ours = sample_images(bundle, bundle.denoiser, LCMScheduler.from_config(bundle.scheduler_config),
                         ["a handwritten digit seven"], [3], 4, 1.0, 32, 32)[0].permute(1, 2, 0).numpy()
    assert abs(_run(pipe) - ours).max() < 2e-4



def test_eval_takes_the_lora_folder(lora_run, tmp_path):
    """`fewstep eval` loads a LoRA folder as `fewstep sample` does, with the folder's own sampler."""
    assert main(["eval", "--model", f"lcm-lora={lora_run}", "--features", "random", "--num_images", "2",
                 "--steps", "1", "--batch_size", "2", "--out", str(tmp_path / "eval")]) == 0
    rows = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert [(r["label"], r["scheduler"], r["steps"], r["guidance_scale"]) for r in rows] == [("lcm-lora", "lcm", 1, 1.0)]
    assert np.isfinite(rows[0]["frechet_distance"])
