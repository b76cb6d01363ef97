"""Latent consistency distillation (LCD): LCM paper (arXiv 2310.04378), Algorithm 1.

Per sample: a skip-step pair s = τ[n], t = s − k on the DDIM grid; the teacher takes one DDIM step
from z_s to z_t with classifier-free guidance at scale w; the student at z_s must agree with the EMA
target at z_t (self-consistency), both through the boundary scalings c_skip / c_out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..diffusion.sampling import make_scheduler, sample_images
from ..diffusion.schedule import (
    boundary_scalings,
    ddim_step,
    guidance_scale_embedding,
    pseudo_huber,
    skip_step_grid,
)
from ..export import export_pipeline
from ..models.bundle import cat_cond, frozen_copy, weight_dtype_of
from ..training.ema import ema_update
from .base import Group, Method, StepOutput, register


@dataclass
class LCMConfig:
    w_min: float = 5.0  # guidance scale w ~ U[w_min, w_max] (SD 5, SDXL 3)
    w_max: float = 15.0
    num_ddim_timesteps: int = 50  # teacher solver grid; skip k = 1000 / this
    loss_type: str = "l2"  # l2 or huber
    huber_c: float = 0.001  # pseudo-Huber c
    timestep_scaling_factor: float = 10.0  # sharpness of c_skip / c_out around t = 0
    unet_time_cond_proj_dim: int = 256  # dim of the student's guidance (w) embedding
    ema_decay: float = 0.95  # μ of the EMA target network θ⁻

    def validate(self):
        if self.loss_type not in ("l2", "huber"):
            raise ConfigError("--loss_type must be l2 or huber")
        if not 0 <= self.w_min <= self.w_max:
            raise ConfigError(f"need 0 <= --w_min <= --w_max, got {self.w_min} and {self.w_max}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("--ema_decay must be in [0, 1)")
        if self.num_ddim_timesteps < 1:
            raise ConfigError("--num_ddim_timesteps must be >= 1")
        if self.unet_time_cond_proj_dim < 2:
            raise ConfigError("--unet_time_cond_proj_dim must be >= 2")
        if self.huber_c <= 0:
            raise ConfigError("--huber_c must be > 0")


@register
class LCM(Method):
    name = "lcm"
    Config = LCMConfig

    def __init__(self, cfg, mcfg: LCMConfig, bundle, accelerator):
        super().__init__(cfg, mcfg, bundle, accelerator)
        # Frozen parts in the mixed-precision dtype; the teacher UNet too with --cast_teacher_unet.
        wdt = weight_dtype_of(cfg.mixed_precision)
        bundle.to(accelerator.device, dtype=wdt, unet_dtype=wdt if cfg.cast_teacher_unet else torch.float32)
        self.teacher = bundle.unet
        self.student = bundle.new_denoiser(time_cond_proj_dim=mcfg.unet_time_cond_proj_dim)
        if cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.target = frozen_copy(self.student).to(accelerator.device)  # θ⁻
        self.tau, self.k = skip_step_grid(bundle.schedule.num_train_timesteps, mcfg.num_ddim_timesteps)
        self.tau = self.tau.to(accelerator.device)

    def groups(self):
        return {"student": Group(self.student)}

    def stateful(self):
        return {"target": self.target}

    def loss(self, phase, batch, step):
        m, sch, B = self.mcfg, self.bundle.schedule, len(batch["caption"])
        dev = self.accelerator.device
        x0, cond = self.bundle.encode_batch(batch, self.cfg.proportion_empty_prompts)

        # Alg. 1: n ~ U{0..N−1}, s = τ[n] (z_{t_{n+k}}), t = s − k (z_{t_n}); ᾱ_0 when s − k < 0.
        n = torch.randint(0, m.num_ddim_timesteps, (B,), device=dev)
        s = self.tau[n]
        t = (s - self.k).clamp(min=0)
        eps = torch.randn_like(x0)
        z_s = sch.add_noise(x0, eps, s)
        w = m.w_min + (m.w_max - m.w_min) * torch.rand(B, device=dev)
        w_emb = guidance_scale_embedding(w, m.unet_time_cond_proj_dim).to(dev)
        w_ = w.view(-1, 1, 1, 1)
        c_skip_s, c_out_s = (c.view(-1, 1, 1, 1) for c in boundary_scalings(s, m.timestep_scaling_factor))
        c_skip_t, c_out_t = (c.view(-1, 1, 1, 1) for c in boundary_scalings(t, m.timestep_scaling_factor))

        # Online network: f_θ(z_s, w, c, s) = c_skip(s) z_s + c_out(s) x̂₀_θ.
        x0_s, _ = sch.to_x0_eps(self.bundle.predict(self.student, z_s, s, cond, w_emb), z_s, s)
        f_theta = c_skip_s * z_s + c_out_s * x0_s

        with torch.no_grad():
            # Teacher: one guided DDIM step s → t; cond and uncond in a single batched forward.
            out = self.bundle.predict(self.teacher, torch.cat([z_s, z_s]), torch.cat([s, s]),
                                      cat_cond(cond, self.bundle.uncond(B)))
            x0_both, eps_both = sch.to_x0_eps(out, torch.cat([z_s, z_s]), torch.cat([s, s]))
            (x0_c, x0_u), (eps_c, eps_u) = x0_both.chunk(2), eps_both.chunk(2)
            x0_hat = x0_c + w_ * (x0_c - x0_u)
            eps_hat = eps_c + w_ * (eps_c - eps_u)
            a_t, sig_t = sch.coeffs(t, z_s)
            z_t = ddim_step(x0_hat, eps_hat, a_t, sig_t)
            # Target: f_θ⁻(z_t, w, c, t) with the EMA network.
            x0_t, _ = sch.to_x0_eps(self.bundle.predict(self.target, z_t, t, cond, w_emb), z_t, t)
            target = c_skip_t * z_t + c_out_t * x0_t

        if m.loss_type == "l2":
            loss = F.mse_loss(f_theta.float(), target.float())
        else:
            loss = pseudo_huber(f_theta, target, m.huber_c)
        return StepOutput(loss, {"loss": loss.detach()})

    def after_step(self, phase, step):
        # θ⁻ ← μ θ⁻ + (1 − μ) θ
        ema_update(self.target, self.accelerator.unwrap_model(self.student), self.mcfg.ema_decay)

    # ---- sampling and export -------------------------------------------------------------
    def scheduler(self):
        return make_scheduler("lcm", self.bundle.scheduler_config,
                              original_inference_steps=self.mcfg.num_ddim_timesteps,
                              timestep_scaling=self.mcfg.timestep_scaling_factor)

    def sample(self, prompts, seeds, num_inference_steps, guidance_scale):
        unet = self.accelerator.unwrap_model(self.student)
        res = self.cfg.resolution
        with self.accelerator.autocast():
            return sample_images(self.bundle, unet, self.scheduler(), prompts, seeds, num_inference_steps,
                                 guidance_scale, res, res)

    def export(self, out_dir: Path):
        unet = self.accelerator.unwrap_model(self.student)
        export_pipeline(self.bundle, unet, self.scheduler(), out_dir,
                        vae_override=self.cfg.pretrained_vae_model_name_or_path)
        return {
            "scheduler": "LCMScheduler",
            "num_inference_steps": 4,
            "guidance_scale": self.cfg.validation_guidance_scale,
            "guidance_note": "The UNet embeds the guidance scale (time_cond_proj_dim) and runs no CFG batch; "
                             f"it was trained on guidance_scale = w + 1 for w in [{self.mcfg.w_min}, {self.mcfg.w_max}].",
        }
