"""Latent consistency distillation (LCD): LCM paper (arXiv 2310.04378), Algorithm 1; and LCM-LoRA
(arXiv 2311.05556) as a switch of the same method.

Per sample: a skip-step pair s = τ[n], t = s − k on the DDIM grid; the teacher takes one DDIM step
from z_s to z_t with classifier-free guidance at scale w; the student at z_s must agree with the EMA
target at z_t (self-consistency), both through the boundary scalings c_skip / c_out.

Full model: the student is a copy of the teacher UNet with a guidance embedding of w
(``time_cond_proj_dim``) and an EMA target network. LoRA (``--lora_rank`` / ``--is_lora``): ONE UNet in
memory; the student is the teacher plus LoRA adapters, the teacher is the same UNet with adapters
disabled, no w embedding (guidance is baked in), and the target is the student itself, or an EMA
copy of the adapters when ``--ema_decay`` is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
from ..models.lora import (
    DEFAULT_TARGETS,
    active_adapter,
    adapters_disabled,
    add_ema_adapter,
    attach_lora,
    save_lora,
)
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
    unet_time_cond_proj_dim: int = 256  # dim of the student's guidance (w) embedding (full model)
    ema_decay: float | None = None  # μ of the EMA target θ⁻ (default 0.95; LoRA: off unless given)
    is_lora: bool = False  # train LoRA adapters (LCM-LoRA); PaddleMIX's name
    lora_rank: int | None = None  # LoRA rank r; giving it selects LCM-LoRA (default 64)
    lora_alpha: float | None = None  # LoRA α, scale α / r (default: r)
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))

    @property
    def lora(self) -> bool:
        return self.is_lora or self.lora_rank is not None

    @property
    def rank(self) -> int:
        return self.lora_rank or 64

    @property
    def mu(self) -> float | None:
        """EMA decay in force: None means the target is the online student itself (LoRA default)."""
        if self.ema_decay is None:
            return None if self.lora else 0.95
        return self.ema_decay

    def validate(self):
        if self.loss_type not in ("l2", "huber"):
            raise ConfigError("--loss_type must be l2 or huber")
        if not 0 <= self.w_min <= self.w_max:
            raise ConfigError(f"need 0 <= --w_min <= --w_max, got {self.w_min} and {self.w_max}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError("--ema_decay must be in [0, 1)")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError("--lora_rank must be >= 1")
        if self.lora_dropout < 0 or self.lora_dropout >= 1:
            raise ConfigError("--lora_dropout must be in [0, 1)")
        if not self.lora_target_modules:
            raise ConfigError("--lora_target_modules must name at least one module")
        given = [k for k, on in (("lora_alpha", self.lora_alpha is not None), ("lora_dropout", self.lora_dropout != 0),
                                 ("lora_target_modules", list(self.lora_target_modules) != list(DEFAULT_TARGETS)))
                 if on]
        if given and not self.lora:
            # (otherwise they would be parsed and silently unused by the full-model run)
            raise ConfigError(f"--{', --'.join(given)} configure LoRA adapters: add --lora_rank R for LCM-LoRA, "
                              "or drop them for full-model LCD")
        if self.num_ddim_timesteps < 1 or 1000 % self.num_ddim_timesteps:
            raise ConfigError("--num_ddim_timesteps must divide the teacher's 1000 training timesteps "
                              f"(50, 25, 100, ...), got {self.num_ddim_timesteps}")
        if self.unet_time_cond_proj_dim < 4:  # the sinusoidal embedding needs two frequencies per half
            raise ConfigError(f"--unet_time_cond_proj_dim must be >= 4 (typically 256), got {self.unet_time_cond_proj_dim}")
        if self.huber_c <= 0:
            raise ConfigError("--huber_c must be > 0")


@register
class LCM(Method):
    name = "lcm"
    Config = LCMConfig
    resume_keys = ("is_lora", "lora_rank", "lora_target_modules", "unet_time_cond_proj_dim")

    @classmethod
    def memory_hints(cls, cfg, mcfg):
        return [f"LoRA: --lora_rank 64{' (already on)' if mcfg.lora else ''} (train adapters only; one UNet in memory)"]

    def __init__(self, cfg, mcfg: LCMConfig, bundle, accelerator):
        super().__init__(cfg, mcfg, bundle, accelerator)
        wdt = weight_dtype_of(cfg.mixed_precision)
        self.tau, self.k = skip_step_grid(bundle.schedule.num_train_timesteps, mcfg.num_ddim_timesteps)
        self.tau = self.tau.to(accelerator.device)
        self.target = None
        self.ema_pairs = None
        if mcfg.lora:
            # One UNet: frozen base weights in the mixed-precision dtype, fp32 adapters on top.
            bundle.to(accelerator.device, dtype=wdt, unet_dtype=wdt)
            self.student = bundle.unet
            self.lora_cfg = attach_lora(self.student, mcfg.rank, mcfg.lora_alpha or mcfg.rank, mcfg.lora_dropout,
                                        mcfg.lora_target_modules)
            if mcfg.mu is not None:
                self.ema_pairs = add_ema_adapter(self.student, self.lora_cfg)
            self.w_dim = None
        else:
            # Frozen parts in the mixed-precision dtype; the teacher UNet too with --cast_teacher_unet.
            bundle.to(accelerator.device, dtype=wdt, unet_dtype=wdt if cfg.cast_teacher_unet else torch.float32)
            self.teacher = bundle.unet
            self.student = bundle.new_denoiser(time_cond_proj_dim=mcfg.unet_time_cond_proj_dim)
            self.target = frozen_copy(self.student).to(accelerator.device)  # θ⁻
            self.w_dim = mcfg.unet_time_cond_proj_dim
        if cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()

    def groups(self):
        if self.mcfg.lora:
            params = [p for _, p in self._adapter("default")]
            return {"student": Group(self.student, params=params)}
        return {"student": Group(self.student)}

    def _adapter(self, name):
        from ..models.lora import adapter_params

        return adapter_params(self.accelerator.unwrap_model(self.student), name)

    def stateful(self):
        # LoRA keeps its EMA adapter inside the UNet, which accelerate already saves.
        return {"target": self.target} if self.target is not None else {}

    def _teacher(self, z, t, cond):
        if self.mcfg.lora:
            with adapters_disabled(self.accelerator.unwrap_model(self.student)) as base:
                return self.bundle.predict(base, z, t, cond)
        return self.bundle.predict(self.teacher, z, t, cond)

    def _target(self, z, t, cond, w_emb):
        if self.target is not None:
            return self.bundle.predict(self.target, z, t, cond, w_emb)
        unet = self.accelerator.unwrap_model(self.student)
        if self.ema_pairs is not None:
            with active_adapter(unet, "ema"):
                return self.bundle.predict(unet, z, t, cond)
        return self.bundle.predict(unet, z, t, cond)  # μ = 0: the student itself, no gradient

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
        w_emb = guidance_scale_embedding(w, self.w_dim).to(dev) if self.w_dim else None
        w_ = w.view(-1, 1, 1, 1)
        c_skip_s, c_out_s = (c.view(-1, 1, 1, 1) for c in boundary_scalings(s, m.timestep_scaling_factor))
        c_skip_t, c_out_t = (c.view(-1, 1, 1, 1) for c in boundary_scalings(t, m.timestep_scaling_factor))

        # Online network: f_θ(z_s, w, c, s) = c_skip(s) z_s + c_out(s) x̂₀_θ.
        x0_s, _ = sch.to_x0_eps(self.bundle.predict(self.student, z_s, s, cond, w_emb), z_s, s)
        f_theta = c_skip_s * z_s + c_out_s * x0_s

        with torch.no_grad():
            # Teacher: one guided DDIM step s → t; cond and uncond in a single batched forward.
            out = self._teacher(torch.cat([z_s, z_s]), torch.cat([s, s]), cat_cond(cond, self.bundle.uncond(B)))
            x0_both, eps_both = sch.to_x0_eps(out, torch.cat([z_s, z_s]), torch.cat([s, s]))
            (x0_c, x0_u), (eps_c, eps_u) = x0_both.chunk(2), eps_both.chunk(2)
            x0_hat = x0_c + w_ * (x0_c - x0_u)
            eps_hat = eps_c + w_ * (eps_c - eps_u)
            a_t, sig_t = sch.coeffs(t, z_s)
            z_t = ddim_step(x0_hat, eps_hat, a_t, sig_t)
            # Target: f_θ⁻(z_t, w, c, t) with the EMA network.
            x0_t, _ = sch.to_x0_eps(self._target(z_t, t, cond, w_emb), z_t, t)
            target = c_skip_t * z_t + c_out_t * x0_t

        if m.loss_type == "l2":
            loss = F.mse_loss(f_theta.float(), target.float())
        else:
            loss = pseudo_huber(f_theta, target, m.huber_c)
        return StepOutput(loss, {"loss": loss.detach()})

    def after_step(self, phase, step):
        # θ⁻ ← μ θ⁻ + (1 − μ) θ
        if self.target is not None:
            ema_update(self.target, self.accelerator.unwrap_model(self.student), self.mcfg.mu)
        elif self.ema_pairs is not None:
            ema, online = zip(*self.ema_pairs)
            with torch.no_grad():
                torch._foreach_lerp_(list(ema), [p.detach() for p in online], 1.0 - self.mcfg.mu)

    # ---- sampling and export -------------------------------------------------------------
    def scheduler(self):
        return make_scheduler("lcm", self.bundle.scheduler_config,
                              original_inference_steps=self.mcfg.num_ddim_timesteps,
                              timestep_scaling=self.mcfg.timestep_scaling_factor)

    def default_guidance(self) -> float:
        # LCM-LoRA bakes guidance in (CFG off at 1.0); the full student embeds w, so 8 = w 7 + 1.
        return 1.0 if self.mcfg.lora else 8.0

    def sample(self, prompts, seeds, num_inference_steps, guidance_scale):
        unet = self.accelerator.unwrap_model(self.student)
        if guidance_scale is None:
            guidance_scale = self.default_guidance()
        res = self.cfg.resolution
        with self.accelerator.autocast():
            return sample_images(self.bundle, unet, self.scheduler(), prompts, seeds, num_inference_steps,
                                 guidance_scale, res, res)

    def export(self, out_dir: Path):
        unet = self.accelerator.unwrap_model(self.student)
        gs = self.cfg.validation_guidance_scale or self.default_guidance()
        if self.mcfg.lora:
            save_lora(unet, out_dir, self.bundle.pipeline_cls, self.bundle.root)
            self.scheduler().save_pretrained(Path(out_dir) / "scheduler")
            return {"scheduler": "LCMScheduler", "num_inference_steps": 4, "guidance_scale": gs, "lora": True,
                    "guidance_note": f"LCM-LoRA: guidance was baked in at w in [{self.mcfg.w_min}, {self.mcfg.w_max}]; "
                                     "sample with guidance_scale 1 (no CFG) to 2."}
        export_pipeline(self.bundle, unet, self.scheduler(), out_dir,
                        vae_override=self.cfg.pretrained_vae_model_name_or_path)
        return {
            "scheduler": "LCMScheduler",
            "num_inference_steps": 4,
            "guidance_scale": gs,
            "guidance_note": "The UNet embeds the guidance scale (time_cond_proj_dim) and runs no CFG batch; "
                             f"it was trained on guidance_scale = w + 1 for w in [{self.mcfg.w_min}, {self.mcfg.w_max}].",
        }
