"""The Stable Diffusion 3 family: a flow-matching transformer (SD3Transformer2DModel) with diffusers'
FlowMatchEulerDiscreteScheduler, two CLIP text encoders with projection and an optional T5 encoder.

Flow matching: z_σ = (1 − σ) x₀ + σ ε, the transformer predicts the velocity v = ε − x₀ at timestep
1000·σ, and the Euler sampler steps z ← z + (σ_next − σ) v. The prompt is encoded by the vanilla
pipeline's own ``encode_prompt`` (both CLIPs' penultimate states side by side, zero-padded to the
joint width, then the T5 states, or zeros when the folder has no T5), so condition tensors equal those
the pipeline builds; the unconditional input of CFG is the empty prompt encoded the same way, as the
pipeline's default negative prompt is.

Which methods apply: direct distillation (it only needs the sampler). Latent consistency
distillation does not: it is defined on the discrete DDPM schedule (skip-step DDIM solver, ε/v
conversions, a UNet guidance embedding) and the bundle refuses it with that message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError

Cond = dict[str, torch.Tensor]
PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


class SD3Bundle:
    family = "sd3"
    denoiser_name = "transformer"  # the pipeline folder and argument the denoiser is saved under

    def __init__(self, root: str, parts: dict, scheduler_config: dict, vae_encode_batch_size: int = 32):
        self.root = root
        self.parts = parts
        self.unet = parts["transformer"]  # "unet": the name every method uses for the denoiser
        self.vae = parts["vae"]
        self.text_encoder = parts["text_encoder"]
        self.scheduler_config = dict(scheduler_config)
        self.vae_encode_batch_size = vae_encode_batch_size
        self._uncond: Cond | None = None

    @classmethod
    def load(cls, path: str, revision: str | None = None, vae_path: str | None = None, weights: bool = True,
             vae_encode_batch_size: int = 32, **_) -> SD3Bundle:
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        from .bundle import check_teacher_path

        root = check_teacher_path(path, revision)
        index = json.loads((Path(root) / "model_index.json").read_text())
        missing = [p for p in PARTS if not index.get(p) or index[p][0] is None]
        if missing:
            raise ConfigError(f"{root}/model_index.json lacks {', '.join(missing)}: not a StableDiffusion3Pipeline")
        sched_cfg = FlowMatchEulerDiscreteScheduler.load_config(root, subfolder="scheduler")
        if not weights:
            from diffusers import AutoencoderKL, SD3Transformer2DModel

            parts = {"transformer": SD3Transformer2DModel.load_config(root, subfolder="transformer"),
                     "vae": AutoencoderKL.load_config(vae_path or root, subfolder=None if vae_path else "vae"),
                     "text_encoder": None}
            return cls(root, parts, sched_cfg, vae_encode_batch_size)
        kw = {}
        if vae_path:
            from diffusers import AutoencoderKL

            kw["vae"] = AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32)
        # A folder without T5 (text_encoder_3 null) loads only when that is said explicitly, in vanilla
        # diffusers too: StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None).
        for k in ("text_encoder_3", "tokenizer_3"):
            if not index.get(k) or index[k][0] is None:
                kw[k] = None
        pipe = StableDiffusion3Pipeline.from_pretrained(root, torch_dtype=torch.float32, **kw)
        parts = {k: v for k, v in pipe.components.items()}
        bundle = cls(root, parts, sched_cfg, vae_encode_batch_size)
        for m in bundle._modules():
            m.requires_grad_(False).eval()
        return bundle

    def use_cache(self, text_cache) -> None:
        raise ConfigError("--cache_dir is not supported for SD3 teachers (and --method direct, the method for "
                          "them, reads `fewstep generate --save_latents` instead); drop --cache_dir")

    def _modules(self):
        return [m for k, m in self.parts.items() if isinstance(m, torch.nn.Module)]

    def to(self, device, dtype=None, unet_dtype=None) -> SD3Bundle:
        for k, m in self.parts.items():
            if not isinstance(m, torch.nn.Module):
                continue
            dt = unet_dtype if k == "transformer" else dtype
            m.to(device)
            if dt is not None and dt != m.dtype:
                m.to(dtype=dt)
        self._uncond = None
        return self

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return self.vae.config.scaling_factor

    @property
    def shift_factor(self) -> float:
        return self.vae.config.shift_factor or 0.0

    @property
    def schedule(self):
        raise ConfigError("this method (LCD, DMD2, DisBack) is defined on the discrete DDPM schedule of ε/v "
                          "teachers and does not apply to flow-matching teachers (SD3); use --method direct")

    def _pipe(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline(**{k: self.parts.get(k) for k in (
            "transformer", "scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
            "text_encoder_3", "tokenizer_3")})

    # ---- conditioning ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, prompts: list[str], size=None) -> Cond:
        embeds, _, pooled, _ = self._pipe().encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None,
                                                           device=self.device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def uncond(self, batch_size: int, size=None) -> Cond:
        if self._uncond is None:
            self._uncond = self.encode_text([""])
        return {k: v.expand(batch_size, *v.shape[1:]) for k, v in self._uncond.items()}

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """(latent − shift) · scale, as SD3's training scripts and pipeline expect."""
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        parts = []
        for chunk in pixels.split(self.vae_encode_batch_size):
            dist = self.vae.encode(chunk).latent_dist
            parts.append(dist.sample() if sample else dist.mode())
        return (torch.cat(parts).float() - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode((latents / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def encode_batch(self, batch: dict[str, Any], drop_prob: float = 0.0):
        captions = list(batch["caption"])
        if drop_prob > 0:
            drop = torch.rand(len(captions)) < drop_prob
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        return self.encode_images(batch["pixel_values"]), self.encode_text(captions)

    # ---- denoiser -------------------------------------------------------------------------------
    def predict(self, net, z: torch.Tensor, t: torch.Tensor, cond: Cond, timestep_cond=None) -> torch.Tensor:
        """The velocity v̂ = ε̂ − x̂₀ at scheduler timestep t (= 1000·σ)."""
        if timestep_cond is not None:
            raise ConfigError("SD3 transformers have no guidance embedding (timestep_cond)")
        dtype = next(net.parameters()).dtype
        if torch.is_autocast_enabled(z.device.type):
            dtype = z.dtype
        t = torch.as_tensor(t, device=z.device)
        out = net(hidden_states=z.to(dtype), timestep=t.expand(z.shape[0]) if t.ndim == 0 else t,
                  encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                  pooled_projections=cond["pooled_projections"].to(dtype), return_dict=False)[0]
        return out if out.dtype == torch.float64 else out.float().contiguous()

    # ---- export ---------------------------------------------------------------------------------
    @property
    def pipeline_cls(self):
        from diffusers import StableDiffusion3Pipeline

        return StableDiffusion3Pipeline

    def pipeline(self, unet, scheduler):
        from diffusers import StableDiffusion3Pipeline

        parts = {k: self.parts.get(k) for k in ("vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                                 "text_encoder_3", "tokenizer_3")}
        return StableDiffusion3Pipeline(transformer=unet, scheduler=scheduler, **parts)


def is_sd3(index: dict) -> bool:
    return "transformer" in index and index.get("_class_name", "").startswith("StableDiffusion3")
