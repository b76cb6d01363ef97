"""Direct distillation (DiffSynth-Studio, seed 002; ALGORITHMS.md §4): the student's own K-step
sampler, unrolled with gradients, must land where the many-step guided teacher landed from the same
initial noise.

Data: rows written by ``fewstep generate`` (``image,prompt,seed,rand_device,num_inference_steps,
cfg_scale``, optionally ``latents``). Per row the initial noise x_T is regenerated bit for bit from
(seed, rand_device); the teacher's endpoint x̂ is the saved latents, or the VAE posterior mean of the
image. The student runs the deterministic scheduler vanilla diffusers runs for it (DDIM with
"trailing" spacing for ε/v teachers, flow-matching Euler for flow teachers) for K steps at the row's
guidance scale w (CFG only when w > 1; a guidance-distilled transformer such as FLUX.1-dev takes w as
its own guidance input, as its pipeline passes ``guidance_scale``, and runs no CFG batch), every step
differentiable, on the grid the family's pipeline samples K steps on:

    z_0 = x_T,   z_{k+1} = step(z_k, D_θ(z_k, t_k, c, w), t_k),   k = 0 … K−1

and the loss is one of
- ``final`` (DiffSynth's DirectDistillLoss):  L = ‖z_K − x̂‖² (mean over elements);
- ``trajectory`` (trajectory imitation, our precise form): the teacher's path is represented by the
  straight coupling of its endpoint and its noise, z*_k = a_k x̂ + s_k x_T with (a_k, s_k) the noise
  level the scheduler assigns to state k (DDIM: a = √ᾱ, s = √(1 − ᾱ) at the next timestep, the final
  ᾱ after the last step; flow matching: a = 1 − σ_k, s = σ_k), and z*_K = x̂ itself. Every state of the
  unrolled student is pulled to it: L = (1/K) Σ_{k=1..K} ‖z_k − z*_k‖². For flow matching this is the
  rectified (straight) path through the teacher's endpoint; the last term is the ``final`` loss.
  DiffSynth adds an LPIPS term on the decoded image; we do not (no LPIPS network offline).

Memory: each sampler step's denoiser call runs under ``torch.utils.checkpoint`` (non-reentrant), so
only the K step inputs are kept and each step's activations are recomputed in the backward pass.
Under DDP (several processes) the recomputation would re-enter the DDP wrapper's forward during the
backward pass, so there the per-step checkpoint is off and ``--gradient_checkpointing`` (checkpointing
inside the denoiser's blocks) bounds memory instead; a warning says so.

The student is the teacher's denoiser itself, trained (no frozen teacher copy is needed: the teacher's
work is in the data), or LoRA adapters on it (``--lora_rank``; UNets and transformers alike). Export:
the diffusers pipeline with that scheduler's config and ``fewstep_sampling.json`` (K, w, sampler), so
the vanilla pipeline at K steps and guidance w reproduces the student.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, refuse_changed, teacher_uses
from ..diffusion.noise import batch_noise
from ..diffusion.sampling import guided_denoiser, is_flow_config, make_scheduler, sample_images, unroll
from ..export import export_pipeline
from ..models.bundle import weight_dtype_of
from ..models.lora import adapter_params, attach_lora, save_lora
from .base import Group, Method, StepOutput, register

log = logging.getLogger("fewstep.direct")
VARIANTS = ("final", "trajectory")


@dataclass
class DirectConfig:
    direct_variant: str = "final"  # final (MSE of the last latents) or trajectory (every step vs the teacher path)
    student_steps: int | None = None  # K; default: each row's num_inference_steps
    student_guidance_scale: float | None = None  # student's CFG scale; default: each row's cfg_scale
    checkpoint_steps: bool = True  # torch.utils.checkpoint around each unrolled denoiser call
    lora_rank: int | None = None  # LoRA rank r; giving it trains adapters instead of the full denoiser
    lora_alpha: float | None = None  # LoRA α, scale α / r (default: r)
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # default: the family's LoRA targets

    def validate(self):
        if self.direct_variant not in VARIANTS:
            raise ConfigError(f"--direct_variant must be one of {', '.join(VARIANTS)}, got {self.direct_variant!r}")
        if self.student_steps is not None and self.student_steps < 1:
            raise ConfigError("--student_steps must be >= 1")
        if self.student_guidance_scale is not None and self.student_guidance_scale < 0:
            raise ConfigError("--student_guidance_scale must be >= 0 (1 = no CFG)")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError("--lora_rank must be >= 1")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError("--lora_dropout must be in [0, 1)")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ConfigError("--lora_target_modules must name at least one module")
        if self.lora_rank is None:
            refuse_changed(self, ("lora_alpha", "lora_dropout", "lora_target_modules"),
                           "without --lora_rank (they configure LoRA adapters): add --lora_rank R, or drop them")

    def validate_run(self, cfg):
        refuse_changed(cfg, ("proportion_empty_prompts",), "for --method direct: each row's caption is the prompt the "
                       "teacher's image was made from, dropping it would mislabel the target; drop it")
        refuse_changed(cfg, ("cast_teacher_unet",), "for --method direct, which holds no teacher network (the "
                       "teacher's work is in the data): drop it")
        refuse_changed(cfg, ("use_fix_crop_and_size",), "for --method direct: the student is conditioned on the "
                       "generation size only, as the pipeline samples it; drop it")
        if not cfg.validation_steps:
            refuse_changed(cfg, ("validation_guidance_scale",), "with --validation_steps 0: drop it")

    def uses(self, cfg, bundle=None) -> dict:
        """The keys this run uses (config.used_settings)."""
        keys = ["direct_variant", "student_steps", "student_guidance_scale", "checkpoint_steps", "lora_rank",
                "learning_rate", "vae_encode_batch_size"]  # (images without saved latents are encoded)
        keys += ["lora_alpha", "lora_dropout", "lora_target_modules"] if self.lora_rank is not None else []
        keys += ["validation_guidance_scale"] if cfg.validation_steps else []
        return {**teacher_uses(cfg), **{k: getattr(self if hasattr(self, k) else cfg, k) for k in keys}}


def student_scheduler(scheduler_config: dict):
    """The deterministic few-step scheduler of a teacher's schedule: flow-matching Euler for flow
    teachers, DDIM with "trailing" spacing (first step at t = N − 1) otherwise; returns (scheduler,
    short name)."""
    if is_flow_config(scheduler_config):
        return make_scheduler("flow-euler", scheduler_config), "flow-euler"
    return make_scheduler("ddim", scheduler_config, set_alpha_to_one=scheduler_config.get("set_alpha_to_one", False),
                          clip_sample=False), "ddim"


def state_levels(scheduler) -> list[tuple[float, float]]:
    """(a_k, s_k) of each state z_k, k = 1 … K, after ``set_timesteps``: z_k ≈ a_k x₀ + s_k ε."""
    name = type(scheduler).__name__
    if name == "DDIMScheduler":
        ts = scheduler.timesteps.tolist()
        acp = [float(scheduler.alphas_cumprod[t]) for t in ts[1:]] + [float(scheduler.final_alpha_cumprod)]
        return [(a ** 0.5, (1 - a) ** 0.5) for a in acp]
    if name == "FlowMatchEulerDiscreteScheduler":
        return [(1.0 - float(s), float(s)) for s in scheduler.sigmas[1:]]
    raise ConfigError(f"--direct_variant trajectory has no noise levels for {name}; use --direct_variant final")


class _Sampling:
    """The K and guidance the student is trained for (from the data), kept in checkpoints for export."""

    def __init__(self):
        self.K, self.w = None, None

    def state_dict(self):
        return {"K": self.K, "w": self.w}

    def load_state_dict(self, d):
        self.K, self.w = d["K"], d["w"]


def _one(values, what: str, option: str):
    distinct = sorted(set(values))
    if len(distinct) != 1:
        raise ConfigError(f"a batch mixes {what} {distinct}: the rows must share one value, or set --{option}")
    return distinct[0]


@register
class Direct(Method):
    name = "direct"
    Config = DirectConfig
    resume_keys = ("lora_rank", "lora_target_modules")
    task_names = ("direct_distill",)  # DiffSynth-Studio's --task for this method

    @classmethod
    def memory_hints(cls, cfg, mcfg):
        on = " (already on)" if mcfg.lora_rank is not None else ""
        return [f"LoRA: --lora_rank 64{on} (train adapters only; one denoiser in memory)"]

    @classmethod
    def check_setup(cls, cfg, mcfg, bundle) -> None:
        # Every family, flow-matching ones included: the student's own sampler is unrolled, no DDPM math.
        if cfg.random_flip:
            raise ConfigError("--method direct regresses onto the teacher's image from the same noise: "
                              "--random_flip would mirror the target; drop it")
        if getattr(cfg, "cache_dir", None):
            raise ConfigError("--cache_dir: --method direct reads the teacher's latents from `fewstep generate "
                              "--save_latents` (its own regression targets), not from a cache; drop --cache_dir")
        if not cfg.train_data_dir:
            raise ConfigError("--method direct needs teacher data from `fewstep generate` as --train_data_dir")

    def __init__(self, cfg, mcfg: DirectConfig, bundle, accelerator):
        super().__init__(cfg, mcfg, bundle, accelerator)
        self.check_setup(cfg, mcfg, bundle)
        wdt = weight_dtype_of(cfg.mixed_precision)
        self.lora = mcfg.lora_rank is not None
        # No frozen teacher: its work is in the data. The student is the teacher's denoiser itself.
        bundle.to(accelerator.device, dtype=wdt, denoiser_dtype=wdt if self.lora else torch.float32)
        self.student = bundle.denoiser
        if self.lora:
            attach_lora(self.student, mcfg.lora_rank, mcfg.lora_alpha or mcfg.lora_rank, mcfg.lora_dropout,
                        mcfg.lora_target_modules or bundle.lora_targets)
        else:
            self.student.requires_grad_(True)
        self.student.train()
        if cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.sched, self.sampler_name = student_scheduler(bundle.scheduler_config)
        self.checkpoint = mcfg.checkpoint_steps and accelerator.num_processes == 1
        if mcfg.checkpoint_steps and accelerator.num_processes > 1:
            log.warning("several processes: per-step checkpointing is off (it would re-enter DDP's forward in "
                        "the backward pass); use --gradient_checkpointing to bound memory")
        root = Path(cfg.train_data_dir)
        self.data_root = root if root.is_dir() else root.parent
        self.sampling = _Sampling()
        self._grids_ok: set[int] = set()
        self.sampling.K, self.sampling.w = mcfg.student_steps, mcfg.student_guidance_scale

    def groups(self):
        if self.lora:
            return {"student": Group(self.student, params=[p for _, p in adapter_params(self.student)])}
        return {"student": Group(self.student)}

    def stateful(self):
        return {"sampling": self.sampling}

    # ---- data ---------------------------------------------------------------------------------
    def _row_settings(self, meta: dict, B: int) -> tuple[int, float]:
        m = self.mcfg
        K = m.student_steps
        if K is None:
            if "num_inference_steps" not in meta:
                raise ConfigError("the data has no num_inference_steps column: set --student_steps")
            K = int(_one([int(float(v)) for v in meta["num_inference_steps"]], "num_inference_steps",
                         "student_steps"))
        w = m.student_guidance_scale
        if w is None:
            w = float(_one([float(v) for v in meta["cfg_scale"]], "cfg_scale", "student_guidance_scale")) \
                if "cfg_scale" in meta else 1.0
        return K, w

    def _teacher_latents(self, batch, meta) -> torch.Tensor:
        """x̂: the teacher's saved final latents if the data has them, else the VAE posterior mean."""
        dev = self.accelerator.device
        if meta.get("latents") and all(meta["latents"]):
            from safetensors.torch import load_file

            return torch.stack([load_file(str(self.data_root / p))["latents"] for p in meta["latents"]]).to(dev)
        return self.bundle.encode_images(batch["pixel_values"], sample=False).to(dev)

    def denoiser(self, net, captions: list[str], w: float):
        """D(z, t): the student's (guided) output, as the pipeline computes it (CFG over one uncond ‖
        cond batch when w > 1; a guidance-distilled student takes w as its guidance input instead)."""
        res = self.cfg.resolution
        cond = self.bundle.encode_text(captions, size=(res, res))
        if self.bundle.guidance_embedding == "native" and self.bundle.embeds_guidance(net):
            # a guidance-distilled student takes w as its own input, as its pipeline passes it: no CFG batch
            g = torch.full((len(captions),), self.bundle.guidance_input(w), device=self.accelerator.device)
            return guided_denoiser(self.bundle, net, cond, None, w, g)
        uncond = self.bundle.uncond(len(captions), size=(res, res)) if w > 1.0 else None
        return guided_denoiser(self.bundle, net, cond, uncond, w)

    def _check_grid(self, K: int) -> None:
        """Refuse a step count the student's scheduler cannot sample: a flow scheduler stretched to a
        terminal σ (``shift_terminal``) divides by zero on a one-step grid, in the vanilla pipeline too."""
        if K in self._grids_ok:
            return
        res = self.cfg.resolution
        kw = self.bundle.timestep_kwargs(res, res, num_inference_steps=K, scheduler=self.sched)
        if "sigmas" in kw or "timesteps" in kw:
            self.sched.set_timesteps(**kw)
        else:
            self.sched.set_timesteps(K, **kw)
        if not torch.isfinite(torch.as_tensor(self.sched.sigmas if hasattr(self.sched, "sigmas")
                                              else self.sched.timesteps)).all():
            raise ConfigError(f"the student's {type(self.sched).__name__} (the teacher's scheduler config, "
                              f"shift_terminal={self.bundle.scheduler_config.get('shift_terminal')}) has no finite "
                              f"{K}-step grid: train for >= 2 steps (--student_steps, or the rows' "
                              "num_inference_steps)")
        self._grids_ok.add(K)

    # ---- loss ---------------------------------------------------------------------------------
    def loss(self, phase, batch, step):
        meta = batch.get("meta") or {}
        if "seed" not in meta:
            raise ConfigError("--method direct needs rows with seed and rand_device columns (the DiffSynth "
                              "metadata written by `fewstep generate`); this data has none")
        B, res, dev = len(batch["caption"]), self.cfg.resolution, self.accelerator.device
        K, w = self._row_settings(meta, B)
        self._check_grid(K)
        self.sampling.K, self.sampling.w = K, w
        shape = self.bundle.latent_shape(res, res)
        devices = meta.get("rand_device") or ["cpu"] * B
        x_T = batch_noise([int(s) for s in meta["seed"]], devices, shape, device=dev)
        with torch.no_grad():
            x_hat = self._teacher_latents(batch, meta).float()
        if x_hat.shape != x_T.shape:
            raise ConfigError(f"teacher latents have shape {tuple(x_hat.shape[1:])} but --resolution {res} gives "
                              f"{shape}: train at the resolution the data was generated at")
        denoise = self.denoiser(self.student, list(batch["caption"]), w)
        with self.accelerator.autocast():
            # the grid the family's pipeline samples K steps on (FLUX: its own sigmas, not the scheduler's)
            states = unroll(denoise, self.sched, x_T, K, self.checkpoint,
                            timestep_kwargs=self.bundle.timestep_kwargs(res, res, num_inference_steps=K,
                                                                        scheduler=self.sched))
        z_K = states[-1].float()
        final = F.mse_loss(z_K, x_hat)
        logs = {"loss_final": final.detach()}
        if self.mcfg.direct_variant == "final":
            loss = final
        else:
            levels = state_levels(self.sched)
            terms = [F.mse_loss(z.float(), a * x_hat + s * x_T) for z, (a, s) in zip(states[1:-1], levels[:-1])]
            loss = (sum(terms) + final) / K
        logs["loss"] = loss.detach()
        return StepOutput(loss, logs)

    # ---- sampling and export ------------------------------------------------------------------
    def sample(self, prompts, seeds, num_inference_steps, guidance_scale):
        net = self.accelerator.unwrap_model(self.student)
        w = guidance_scale if guidance_scale is not None else (self.sampling.w or 1.0)
        sched, _ = student_scheduler(self.bundle.scheduler_config)
        res = self.cfg.resolution
        with self.accelerator.autocast():
            return sample_images(self.bundle, net, sched, prompts, seeds, num_inference_steps, w, res, res)

    def trained_steps(self):
        # exactly the K of the data (None until the first batch has said it, without --student_steps)
        return (self.sampling.K, self.sampling.K) if self.sampling.K else None

    def export(self, out_dir: Path):
        net = self.accelerator.unwrap_model(self.student)
        sched, name = student_scheduler(self.bundle.scheduler_config)
        K, w = self.sampling.K, self.sampling.w if self.sampling.w is not None else 1.0
        facts = {"scheduler": type(sched).__name__, "sampler": name, "num_inference_steps": K,
                 "valid_steps": self.trained_steps(), "guidance_scale": w,
                 "guidance_note": f"Direct distillation ({self.mcfg.direct_variant}): trained for exactly {K} steps of "
                                  f"{type(sched).__name__} at guidance scale {w:g}; other settings are untrained."}
        if self.lora:
            save_lora(net, out_dir, self.bundle, self.bundle.root)
            sched.save_pretrained(Path(out_dir) / "scheduler")
            facts["lora"] = True
        else:
            export_pipeline(self.bundle, net, sched, out_dir, vae_override=self.cfg.pretrained_vae_model_name_or_path)
        return facts
