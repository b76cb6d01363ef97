"""Latent consistency distillation (LCD): LCM paper (arXiv 2310.04378), Algorithm 1; and LCM-LoRA
(arXiv 2311.05556) as a switch of the same method.

Per sample: a skip-step pair on the solver grid, s = level (n+1)k − 1 and t = the level k below it
(the clean end, t = 0, for n = 0); the teacher takes one guided solver step from z_s to z_t (DDIM on
DDPM tables, Euler on the flow path: the same step α_t x̂₀ + σ_t ε̂ from the guided x̂₀, ε̂) at CFG scale
1 + w; the student at z_s must agree with the EMA target at z_t (self-consistency), both through the
consistency function f = c_skip z + c_out x̂₀. On DDPM tables c_skip / c_out are LCM's boundary
scalings; on the flow path f = x̂₀ = z − σ v̂, which meets the boundary condition f(z, 0) = z exactly
(:meth:`Schedule.consistency_scalings`). The export samples with the matching stock scheduler
(LCMScheduler / FlowMatchLCMScheduler: x̂₀, then re-noised to the next level).

Full model: the student is a copy of the teacher's denoiser with a guidance embedding of w where the
architecture takes one (UNets: ``time_cond_proj_dim``) and an EMA target network; where it takes none
(SD3 transformers) guidance is baked in as LCM-LoRA does. LoRA (``--lora_rank`` / ``--is_lora``): ONE
denoiser in memory; the student is the teacher plus LoRA adapters, the teacher is the same network with
adapters disabled, no w embedding (guidance is baked in), and the target is the student itself, or an
EMA copy of the adapters when ``--ema_decay`` is given.

Guidance-distilled teachers (the bundle's ``guidance_embedding == "native"``: FLUX.1-dev, whose
transformer takes the CFG scale as an input) are read there instead of through a cond ‖ uncond batch: the
teacher step runs once at guidance input 1 + w, and the student (full or LoRA) and its target receive the
same input 1 + w, so the exported student keeps the architecture's guidance input with its meaning (the
guidance scale) and is sampled with ``guidance_scale`` in [1 + w_min, 1 + w_max], no CFG batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, micro_conditioning, refuse_changed, teacher_uses
from ..diffusion.sampling import make_scheduler, sample_images
from ..diffusion.schedule import Prediction, pseudo_huber, skip_step_grid
from ..export import export_pipeline
from ..models.bundle import cat_cond, frozen_copy, weight_dtype_of
from ..models.lora import (
    active_adapter,
    adapter_params,
    adapters_disabled,
    add_ema_adapter,
    attach_lora,
    save_lora,
)
from ..training.ema import ema_lerp, ema_update
from .base import Group, Method, StepOutput, register


@dataclass
class LCMConfig:
    w_min: float = 5.0  # guidance scale w ~ U[w_min, w_max] (SD 5, SDXL 3)
    w_max: float = 15.0
    num_ddim_timesteps: int = 50  # teacher solver grid; skip k = 1000 / this
    loss_type: str = "l2"  # l2 or huber
    huber_c: float = 0.001  # pseudo-Huber c
    timestep_scaling_factor: float = 10.0  # sharpness of c_skip / c_out around t = 0
    unet_time_cond_proj_dim: int = 256  # dim of the student's guidance (w) embedding (full model, UNets)
    ema_decay: float | None = None  # μ of the EMA target θ⁻ (default 0.95; LoRA: off unless given)
    is_lora: bool = False  # train LoRA adapters (LCM-LoRA); PaddleMIX's name
    lora_rank: int | None = None  # LoRA rank r; giving it selects LCM-LoRA (default 64)
    lora_alpha: float | None = None  # LoRA α, scale α / r (default: r)
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # default: the family's (UNet: diffusers' LCM-LoRA list)

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
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ConfigError("--lora_target_modules must name at least one module")
        given = [k for k, on in (("lora_alpha", self.lora_alpha is not None), ("lora_dropout", self.lora_dropout != 0),
                                 ("lora_target_modules", self.lora_target_modules is not None))
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
        if self.loss_type != "huber":
            refuse_changed(self, ("huber_c",), "with --loss_type l2: add --loss_type huber, or drop it")
        if self.lora:
            refuse_changed(self, ("unet_time_cond_proj_dim",), "for LCM-LoRA, whose UNet has no guidance "
                           "embedding (guidance is baked in): drop it, or drop the LoRA options for full-model LCD")

    def validate_run(self, cfg):
        if self.lora and cfg.cast_teacher_unet:
            raise ConfigError("--cast_teacher_unet has no effect for LCM-LoRA: its frozen base (the teacher) is always "
                              "held in the mixed-precision dtype; drop it")

    def uses(self, cfg, bundle=None) -> dict:
        """The keys this run uses (config.used_settings)."""
        keys = ["w_min", "w_max", "num_ddim_timesteps", "loss_type", "timestep_scaling_factor", "ema_decay",
                "is_lora", "lora_rank", "learning_rate", "proportion_empty_prompts", "validation_guidance_scale"]
        keys += ["huber_c"] if self.loss_type == "huber" else []
        if self.lora:
            keys += ["lora_alpha", "lora_dropout", "lora_target_modules"]
        elif bundle is None or bundle.guidance_embedding == "new":  # only where a w embedding can be added
            keys += ["unet_time_cond_proj_dim"]
        keys += ["cast_teacher_unet"] if not self.lora else []
        keys += ["vae_encode_batch_size"] if not cfg.cache_dir else []
        keys += ["use_fix_crop_and_size"] if micro_conditioning(bundle) is not False else []  # per-image size ids
        return {**teacher_uses(cfg), **{k: getattr(self if hasattr(self, k) else cfg, k) for k in keys},
                "lora": self.lora, "rank": self.rank if self.lora else None, "mu": self.mu}


@register
class LCM(Method):
    name = "lcm"
    Config = LCMConfig
    resume_keys = ("is_lora", "lora_rank", "lora_target_modules", "unet_time_cond_proj_dim")

    @classmethod
    def memory_hints(cls, cfg, mcfg):
        return [f"LoRA: --lora_rank 64{' (already on)' if mcfg.lora else ''} (train adapters only; one UNet in memory)"]

    @classmethod
    def check_setup(cls, cfg, mcfg, bundle) -> None:
        if not mcfg.lora and bundle.guidance_embedding != "new":
            refuse_changed(mcfg, ("unet_time_cond_proj_dim",), f"for a {bundle.pipeline_class} teacher, whose "
                           "denoiser takes no added guidance embedding (guidance is baked in): drop it")

    def __init__(self, cfg, mcfg: LCMConfig, bundle, accelerator):
        super().__init__(cfg, mcfg, bundle, accelerator)
        wdt = weight_dtype_of(cfg.mixed_precision)
        self.schedule = bundle.schedule_for(cfg.resolution, cfg.resolution)
        _, self.k = skip_step_grid(self.schedule.num_train_timesteps, mcfg.num_ddim_timesteps)
        self.target = None
        self.ema_pairs = None
        # The student takes w as an input only as a full model of a family that can embed it.
        self.embeds_w = not mcfg.lora and bundle.guidance_embedding == "new"
        # A guidance-distilled teacher (FLUX.1-dev) takes the CFG scale as its own input: the teacher step
        # reads it there (no uncond batch), and the student, full or LoRA, keeps that input at 1 + w.
        self.native = bundle.guidance_embedding == "native"
        if mcfg.lora:
            # One denoiser: frozen base weights in the mixed-precision dtype, fp32 adapters on top.
            bundle.to(accelerator.device, dtype=wdt, denoiser_dtype=wdt)
            self.student = bundle.denoiser
            self.lora_cfg = attach_lora(self.student, mcfg.rank, mcfg.lora_alpha or mcfg.rank, mcfg.lora_dropout,
                                        mcfg.lora_target_modules or bundle.lora_targets)
            if mcfg.mu is not None:
                self.ema_pairs = add_ema_adapter(self.student, self.lora_cfg)
        else:
            # Frozen parts in the mixed-precision dtype; the teacher too with --cast_teacher_unet.
            bundle.to(accelerator.device, dtype=wdt, denoiser_dtype=wdt if cfg.cast_teacher_unet else torch.float32)
            self.teacher = bundle.denoiser
            self.student = bundle.new_denoiser(guidance_dim=mcfg.unet_time_cond_proj_dim if self.embeds_w else None)
            self.target = frozen_copy(self.student).to(accelerator.device)  # θ⁻
        if cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()

    def groups(self):
        if self.mcfg.lora:
            params = [p for _, p in self._adapter("default")]
            return {"student": Group(self.student, params=params)}
        return {"student": Group(self.student)}

    def bind(self, prepared):
        super().bind(prepared)
        if self.ema_pairs is not None:  # the parameters may be new objects (sharded under --fsdp)
            net = self.accelerator.unwrap_model(self.student)
            online = dict(adapter_params(net, "default"))
            self.ema_pairs = [(p, online[n.replace(".ema.", ".default.")]) for n, p in adapter_params(net, "ema")]

    def _adapter(self, name):
        return adapter_params(self.accelerator.unwrap_model(self.student), name)

    def stateful(self):
        # LoRA keeps its EMA adapter inside the UNet, which accelerate already saves.
        return {"target": self.target} if self.target is not None else {}

    def _predict(self, net, z, t, cond, w=None) -> Prediction:
        return self.bundle.predict(net, z, t, cond, w, schedule=self.schedule)

    def _teacher(self, z, t, cond, w=None) -> Prediction:
        if self.mcfg.lora:
            with adapters_disabled(self.accelerator.unwrap_model(self.student)) as base:
                return self._predict(base, z, t, cond, w)
        return self._predict(self.teacher, z, t, cond, w)

    def _target(self, z, t, cond, w) -> Prediction:
        if self.target is not None:
            return self._predict(self.target, z, t, cond, w)
        net = self.accelerator.unwrap_model(self.student)
        w_lora = w if self.native else None  # (a LoRA student embeds no new w; a native one keeps its input)
        if self.ema_pairs is not None:
            with active_adapter(net, "ema"):
                return self._predict(net, z, t, cond, w_lora)
        return self._predict(net, z, t, cond, w_lora)  # μ = 0: the student itself, no gradient

    def loss(self, phase, batch, step):
        m, sch, B = self.mcfg, self.schedule, len(batch["caption"])
        dev = self.accelerator.device
        x0, cond = self.bundle.encode_batch(batch, self.cfg.proportion_empty_prompts)

        # Alg. 1: n ~ U{0..N−1}; s = level (n+1)k − 1 (z_{t_{n+k}}), t = level s − k (z_{t_n}); level −1 is
        # the grid's clean end (DDPM: ᾱ_0, as the reference clamps; flow: σ = 0).
        n = torch.randint(0, m.num_ddim_timesteps, (B,), device=dev)
        level_s = (n + 1) * self.k - 1
        s, t = sch.timestep(level_s), sch.timestep(level_s - self.k)
        eps = torch.randn_like(x0)
        z_s = sch.add_noise(x0, eps, s)
        w = m.w_min + (m.w_max - m.w_min) * torch.rand(B, device=dev)
        w_in = w if self.embeds_w else None
        if self.native:
            w_in = self.bundle.guidance_input(1.0 + w)  # the architecture's own input: the CFG scale 1 + w
        c_skip_s, c_out_s = (c.view(-1, 1, 1, 1) for c in sch.consistency_scalings(s, m.timestep_scaling_factor))
        c_skip_t, c_out_t = (c.view(-1, 1, 1, 1) for c in sch.consistency_scalings(t, m.timestep_scaling_factor))

        # Online network: f_θ(z_s, w, c, s) = c_skip(s) z_s + c_out(s) x̂₀_θ.
        f_theta = c_skip_s * z_s + c_out_s * self._predict(self.student, z_s, s, cond, w_in).x0

        with torch.no_grad():
            if self.native:  # the guidance-distilled teacher's output at guidance 1 + w is the guided one
                guided = self._teacher(z_s, s, cond, w_in)
            else:
                # Teacher: one guided solver step s → t; cond and uncond in a single batched forward. The
                # uncond half carries the cond half's image-size conditioning (SDXL's time ids), as the
                # reference scripts and the pipeline give it.
                uncond = self.bundle.uncond(B, like=cond)
                both = self._teacher(torch.cat([z_s, z_s]), torch.cat([s, s]), cat_cond(cond, uncond))
                cond_pred, uncond_pred = (Prediction(*parts) for parts in zip(
                    both.x0.chunk(2), both.eps.chunk(2), both.raw.chunk(2)))
                # CFG scale 1 + w, as the family's pipeline guides
                guided = self.bundle.guide_prediction(cond_pred, uncond_pred, z_s, s, w=w.view(-1, 1, 1, 1),
                                                      schedule=sch)
            z_t = sch.step(guided.x0, guided.eps, t)
            # Target: f_θ⁻(z_t, w, c, t) with the EMA network.
            target = c_skip_t * z_t + c_out_t * self._target(z_t, t, cond, w_in).x0

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
            ema_lerp(list(ema), list(online), self.mcfg.mu)

    # ---- sampling and export -------------------------------------------------------------
    def scheduler(self):
        return make_scheduler("lcm", self.bundle.scheduler_config,
                              original_inference_steps=self.mcfg.num_ddim_timesteps,
                              timestep_scaling=self.mcfg.timestep_scaling_factor)

    def default_guidance(self) -> float:
        # A student that embeds w runs no CFG batch: 8 = w 7 + 1. Baked-in guidance: CFG off at 1.0. A
        # guidance-distilled one: the middle of the scales 1 + w it was distilled at.
        if self.native:
            return 1.0 + (self.mcfg.w_min + self.mcfg.w_max) / 2
        return 8.0 if self.embeds_w else 1.0

    def trained_steps(self):
        # LCMScheduler(original_inference_steps=M) samples n <= M steps on the M-point skip-step grid, every
        # point of which the consistency function is trained at.
        return (1, self.mcfg.num_ddim_timesteps)

    def sample(self, prompts, seeds, num_inference_steps, guidance_scale):
        net = self.accelerator.unwrap_model(self.student)
        if guidance_scale is None:
            guidance_scale = self.default_guidance()
        res = self.cfg.resolution
        with self.accelerator.autocast():
            return sample_images(self.bundle, net, self.scheduler(), prompts, seeds, num_inference_steps,
                                 guidance_scale, res, res)

    def export(self, out_dir: Path):
        net = self.accelerator.unwrap_model(self.student)
        gs = self.cfg.validation_guidance_scale or self.default_guidance()
        sched = self.scheduler()
        name = type(sched).__name__
        baked = (f"guidance was baked in at CFG scale 1 + w for w in [{self.mcfg.w_min}, {self.mcfg.w_max}]; sample "
                 "with guidance_scale 1 (no CFG batch) to 2.")
        if self.native:
            lo, hi = 1 + self.mcfg.w_min, 1 + self.mcfg.w_max
            baked = (f"the transformer keeps its guidance input (guidance_embeds): it was distilled at guidance = "
                     f"the teacher's guidance scale 1 + w for w in [{self.mcfg.w_min}, {self.mcfg.w_max}]; sample "
                     f"with guidance_scale in [{lo:g}, {hi:g}], which the pipeline passes to that input (no CFG "
                     "batch).")
        if self.mcfg.lora:
            save_lora(net, out_dir, self.bundle, self.bundle.root)
            sched.save_pretrained(Path(out_dir) / "scheduler")
            return {"scheduler": name, "num_inference_steps": 4, "valid_steps": self.trained_steps(),
                    "guidance_scale": gs, "lora": True, "guidance_note": "LCM-LoRA: " + baked}
        export_pipeline(self.bundle, net, sched, out_dir, vae_override=self.cfg.pretrained_vae_model_name_or_path)
        note = ("The denoiser embeds the guidance scale (time_cond_proj_dim) and runs no CFG batch; it was trained "
                f"on guidance_scale = w + 1 for w in [{self.mcfg.w_min}, {self.mcfg.w_max}]." if self.embeds_w
                else baked[0].upper() + baked[1:] if self.native
                else "This architecture takes no guidance input: " + baked)
        return {"scheduler": name, "num_inference_steps": 4, "valid_steps": self.trained_steps(), "guidance_scale": gs,
                "guidance_note": note}
