"""Train a small text-to-image latent diffusion teacher from scratch (`fewstep train-teacher`).

Not a distillation method, but it runs through the same trainer, checkpoints and logging: phase
"vae" first trains the AutoencoderKL (reconstruction + KL), phase "unet" then trains the denoiser on
the frozen VAE's latents with its schedule's standard objective (DDPM: ε or v; flow matching: the
velocity ε − x₀, levels drawn uniformly from the shifted table) and caption dropout for classifier-free
guidance. The architecture comes from a preset of a model family (``--teacher_preset``: a UNet on the
DDPM table, or an SD3-architecture transformer on the flow path); ``--teacher_vae`` reuses another
teacher's trained VAE and skips the VAE phase. The CLIP text encoder(s) keep their random
initialisation and stay frozen: a fixed, distinct embedding per prompt is all the cross-attention needs
at this scale. (The phase is named "unet" for every architecture: it is how checkpoints and logs have
always called the denoiser's group.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, refuse_changed
from ..diffusion.sampling import make_scheduler, sample_images
from ..models.bundle import arch_presets, frozen_copy, new_bundle, weight_dtype_of
from ..training.ema import ema_update
from .base import Group, Method, StepOutput, register


@dataclass
class TeacherConfig:
    teacher_preset: str = "mnist"  # architecture preset: see `fewstep distill --help` (mnist, tiny, mnist-flow, ...)
    prediction_type: str | None = None  # epsilon or v_prediction for DDPM presets (default epsilon); flow presets: flow
    teacher_vae: str | None = None  # reuse this teacher folder's (or VAE folder's) trained VAE; no VAE phase
    vae_train_steps: int | None = None  # optimizer steps of the VAE phase, then the denoiser's (default 2000; 0 with --teacher_vae)
    vae_learning_rate: float = 1e-3
    vae_kl_weight: float = 1e-6  # weight of KL(q(z|x) ‖ N(0, I)); small, as in SD's VAE
    teacher_ema_decay: float = 0.999  # EMA of the denoiser's weights; the EMA is what gets exported (0: off)
    caption_dropout: float = 0.1  # probability of training on the empty prompt (enables CFG)
    teacher_guidance_scale: float = 4.0  # CFG scale recommended in the model card / `fewstep sample`
    teacher_inference_steps: int = 50  # steps recommended in the model card / `fewstep sample`

    @property
    def vae_steps(self) -> int:
        if self.vae_train_steps is not None:
            return self.vae_train_steps
        return 0 if self.teacher_vae else 2000

    def validate(self):
        presets = arch_presets()
        if self.teacher_preset not in presets:
            raise ConfigError(f"--teacher_preset must be one of {', '.join(presets)}")
        if self.prediction_type not in (None, "epsilon", "v_prediction", "flow"):
            raise ConfigError("--prediction_type must be epsilon, v_prediction or flow")
        if self.vae_train_steps is not None and self.vae_train_steps < 0:
            raise ConfigError("--vae_train_steps must be >= 0")
        if self.teacher_vae and self.vae_steps:
            raise ConfigError("--teacher_vae reuses a trained VAE, so there is no VAE phase: drop --vae_train_steps "
                              "(or set it to 0)")
        if self.teacher_vae and not Path(self.teacher_vae).is_dir():
            raise ConfigError(f"--teacher_vae {self.teacher_vae}: no such folder (a diffusers pipeline or VAE folder)")
        if not 0 <= self.teacher_ema_decay < 1:
            raise ConfigError("--teacher_ema_decay must be in [0, 1)")
        if not 0 <= self.caption_dropout < 1:
            raise ConfigError("--caption_dropout must be in [0, 1)")
        if self.vae_steps == 0:
            refuse_changed(self, ("vae_learning_rate", "vae_kl_weight"), "without a VAE phase (--vae_train_steps 0 "
                           "or --teacher_vae): drop them")

    def validate_run(self, cfg):
        if self.vae_steps >= cfg.max_train_steps:
            raise ConfigError(f"--vae_train_steps {self.vae_steps} leaves no denoiser steps in --max_train_steps "
                              f"{cfg.max_train_steps}: the denoiser (and --learning_rate) would never train; raise "
                              "--max_train_steps")
        # A teacher is trained from scratch on pixels: the options of a given teacher and of latent data
        # do not apply (--teacher_vae is how a trained VAE is reused).
        if cfg.cache_dir and not self.teacher_vae:
            raise ConfigError("--cache_dir holds the latents of a trained VAE: give the teacher folder that made the "
                              "cache as --teacher_vae (the VAE is then reused), or train from images")
        refuse_changed(cfg, ("pretrained_teacher_model", "teacher_revision", "pretrained_vae_model_name_or_path",
                             "cast_teacher_unet"),
                       "for --method teacher, which trains its own denoiser from scratch on images (a trained VAE: "
                       "--teacher_vae): drop them")
        refuse_changed(cfg, ("proportion_empty_prompts",), "for --method teacher: its caption dropout is "
                       "--caption_dropout (default 0.1); use that")
        refuse_changed(cfg, ("use_fix_crop_and_size",), "for --method teacher: its presets take no size or crop "
                       "conditioning; drop it")
        refuse_changed(cfg, ("vae_encode_batch_size",), "for --method teacher: the whole batch is encoded as the VAE "
                       "trains on it; drop it")
        if not cfg.validation_steps:
            refuse_changed(cfg, ("validation_guidance_scale",), "with --validation_steps 0: drop it")

    def uses(self, cfg, bundle=None) -> dict:
        """The keys this run uses (config.used_settings)."""
        keys = ["teacher_preset", "prediction_type", "teacher_vae", "vae_train_steps", "teacher_ema_decay",
                "caption_dropout", "teacher_guidance_scale", "teacher_inference_steps", "learning_rate"]
        keys += ["vae_learning_rate", "vae_kl_weight"] if self.vae_steps > 0 else []
        keys += ["validation_guidance_scale"] if cfg.validation_steps else []
        return {k: getattr(self if hasattr(self, k) else cfg, k) for k in keys}


class VAEObjective(torch.nn.Module):
    """The VAE's training forward (encode → sample → decode), one module so DDP sees the whole graph."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        post = self.vae.encode(x).latent_dist
        return self.vae.decode(post.sample()).sample, post.kl()


class LatentScale(torch.nn.Module):
    """The VAE latent scaling factor, measured when the VAE phase ends; a buffer so it is checkpointed."""

    def __init__(self):
        super().__init__()
        self.register_buffer("value", torch.tensor(0.0))


@register
class Teacher(Method):
    name = "teacher"
    Config = TeacherConfig
    needs_teacher = False

    @classmethod
    def make_bundle(cls, cfg, mcfg):
        if cfg.cache_dir:  # latents of the reused VAE, made with `fewstep cache --pretrained_teacher_model <it>`
            from ..data.cache import check_cache

            check_cache(cfg, mcfg.teacher_vae, "teacher_vae")
        return new_bundle(mcfg.teacher_preset, Path(cfg.output_dir) / "tokenizer", cfg.seed, mcfg.prediction_type,
                          vae_from=mcfg.teacher_vae)

    def __init__(self, cfg, mcfg: TeacherConfig, bundle, accelerator):
        super().__init__(cfg, mcfg, bundle, accelerator)
        for name in bundle.text_parts:
            if bundle.parts.get(name) is not None:
                bundle.parts[name].to(accelerator.device, weight_dtype_of(cfg.mixed_precision))
        bundle.schedule.to(accelerator.device)
        self.vae, self.unet = VAEObjective(bundle.vae.train()), bundle.denoiser.train()
        if mcfg.teacher_vae:  # a trained VAE: frozen, with the scaling its own teacher uses
            bundle.vae.eval().requires_grad_(False).to(accelerator.device)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.scale = LatentScale().to(accelerator.device)
        if mcfg.teacher_vae:
            self.scale.value.fill_(bundle.scaling_factor)
        self.ema = frozen_copy(self.unet).to(accelerator.device) if mcfg.teacher_ema_decay > 0 else None

    def groups(self):
        groups = {"unet": Group(self.unet)}
        if not self.mcfg.teacher_vae:
            groups = {"vae": Group(self.vae, lr=self.mcfg.vae_learning_rate), **groups}
        return groups

    def bind(self, prepared):
        super().bind(prepared)
        # The bundle must sample and encode with the trained (unwrapped) networks.
        if "vae" in prepared:
            self.bundle.vae = self.accelerator.unwrap_model(self.vae).vae
        self.bundle.denoiser = self.accelerator.unwrap_model(self.unet)

    def stateful(self):
        return {"latent_scale": self.scale, **({"unet_ema": self.ema} if self.ema is not None else {})}

    def after_step(self, phase, step):
        if phase == "unet" and self.ema is not None:
            ema_update(self.ema, self.accelerator.unwrap_model(self.unet), self.mcfg.teacher_ema_decay)

    def _denoiser(self):
        """The network to sample and export: the EMA when there is one."""
        return self.ema if self.ema is not None else self.bundle.denoiser

    def phase(self, step):
        return "vae" if step < self.mcfg.vae_steps else "unet"

    def loss(self, phase, batch, step):
        if phase == "vae":
            x = batch["pixel_values"].to(self.accelerator.device)
            rec, kl = self.vae(x)
            recon = F.mse_loss(rec.float(), x.float())
            kl = kl.mean() / x[0].numel()
            loss = recon + self.mcfg.vae_kl_weight * kl
            return StepOutput(loss, {"loss": loss.detach(), "vae/recon_mse": recon.detach(), "vae/kl": kl.detach()})
        sch = self.bundle.schedule
        if "cached_moments" in batch:  # a reused VAE's posterior from `fewstep cache`, scaled as below
            x0 = self.bundle.latents_from_moments(batch["cached_moments"])
        else:
            x = batch["pixel_values"].to(self.accelerator.device)
            if float(self.scale.value) == 0.0:
                self._measure_scale(x)
            with torch.no_grad():
                # contiguous: the CPU VAE returns channels-last latents, and torch.randn_like would then draw
                # other noise than for the same latents from a cache (as in ModelBundle.encode_images)
                x0 = self.bundle.vae.encode(x.to(self.bundle.vae.dtype)).latent_dist.sample().float().contiguous() \
                    * self.scale.value
        captions = list(batch["caption"])
        drop = torch.rand(len(captions)) < self.mcfg.caption_dropout
        cond = self.bundle.encode_text(["" if d else c for c, d in zip(captions, drop.tolist())])
        t = sch.timestep(torch.randint(0, sch.num_train_timesteps, (x0.shape[0],), device=x0.device))
        eps = torch.randn_like(x0)
        z_t = sch.add_noise(x0, eps, t)
        out = self.bundle.denoise(self.unet, z_t, t, cond)
        # DDPM simple loss (Ho et al. 2020, eq. 14); flow matching (Lipman et al. 2023) with target ε − x₀
        loss = F.mse_loss(out, sch.target(x0, eps, t))
        return StepOutput(loss, {"loss": loss.detach()})

    @torch.no_grad()
    def _measure_scale(self, x):
        """1 / std of the latents, so the diffusion runs on unit-variance latents (SD's 0.18215 likewise)."""
        z = self.bundle.vae.encode(x.to(self.bundle.vae.dtype)).latent_dist.sample().float()
        std = self.accelerator.reduce(z.std().reshape(1), reduction="mean")
        self.scale.value.fill_(1.0 / float(std))
        self.bundle.vae.register_to_config(scaling_factor=float(self.scale.value))
        self.bundle.vae.eval().requires_grad_(False)

    def sample(self, prompts, seeds, num_inference_steps, guidance_scale):
        if float(self.scale.value) == 0.0:  # still in the VAE phase: show reconstructions' decoder
            n = len(prompts)
            return torch.zeros(n, 3, self.cfg.resolution, self.cfg.resolution)
        self.bundle.vae.register_to_config(scaling_factor=float(self.scale.value))
        sched = make_scheduler("ddim", self.bundle.scheduler_config)
        if guidance_scale is None:
            guidance_scale = self.mcfg.teacher_guidance_scale
        with self.accelerator.autocast():
            return sample_images(self.bundle, self._denoiser(), sched, prompts, seeds, num_inference_steps,
                                 guidance_scale, self.cfg.resolution, self.cfg.resolution)

    def export(self, out_dir: Path):
        import diffusers

        from ..export import upcast_half_weights

        self.bundle.vae.register_to_config(scaling_factor=float(self.scale.value))
        b = self.bundle
        name = b.scheduler_config["_class_name"]  # the teacher's own sampler (DDIM / flow Euler)
        b.pipeline(self._denoiser(), getattr(diffusers, name).from_config(b.scheduler_config)).save_pretrained(out_dir)
        # The text encoders ran (frozen) in the mixed-precision dtype; stored in fp32 the folder loads in one
        # dtype in vanilla diffusers (see upcast_half_weights).
        for part in b.text_parts:
            if (Path(out_dir) / part).is_dir():
                upcast_half_weights(Path(out_dir) / part)
        return {"scheduler": name, "num_inference_steps": self.mcfg.teacher_inference_steps,
                "valid_steps": (1, b.schedule.num_train_timesteps), "guidance_scale": self.mcfg.teacher_guidance_scale,
                "title": "Text-to-image teacher trained from scratch with fewstep",
                "guidance_note": "A teacher: sample it with many steps and classifier-free guidance."}
