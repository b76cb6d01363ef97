"""DisBack: distribution backtracking (arXiv 2408.15991), ALGORITHMS.md §6, built on DMD2.

Stage 1, degradation recording: a copy of the teacher score s_θ′ (the DMD2 fake score, full or LoRA)
learns to denoise samples of the initial, untrained generator; every ``--degradation_interval`` steps
its weights are saved, so the path runs from the teacher to the generator's own distribution. With a
LoRA fake score each point of the path is only the LoRA delta (megabytes, where a full SDXL copy is
≈ 15 GB).

Stage 2, backtracking: DMD2's loop, but the "real" score is a point of the path walked backwards. The
fake score s_φ starts at the path's last point (closest to the generator); the first target is the point
before it, and every ``--interval`` stage-2 optimizer steps the target moves one point toward the
teacher, ending on the teacher itself. Targets are loaded strictly (every key present, none extra):
the public code's non-strict load with prefixed keys can silently keep the old target.

Learning-rate schedules: stage 1 advances the fake score's schedule once per step, stage 2 both groups'
on DMD2's iteration clock; the two stages share one schedule per group (the reference runs them as two
programs, each with its own warmup), so the fake score warms up once, in stage 1, and the generator at
the start of stage 2.

``--disback_stage both`` runs stage 1 for ``--degradation_steps`` optimizer steps and stage 2 for the
rest of ``--max_train_steps``; ``degradation`` or ``backtracking`` run one stage alone (stage 2 reads the
path from ``--degradation_path``). The stage, the stage-2 start and the target index are in every
checkpoint, so each of these resumes exactly.

Where this differs from SYZhang0805/DisBack: the strict target load above; path points may be LoRA
deltas instead of full copies; both stages run in one command; ``--interval`` counts stage-2 optimizer
steps (one group per step, as in :mod:`.dmd2`). Everything else (losses, GAN, regression, family
defaults) is DMD2's, as this module builds on it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError, refuse_changed
from ..models.bundle import frozen_copy
from ..models.lora import active_adapter, adapter_params, attach_lora
from ..training.sharding import copy_into, full_tensors
from .base import StepOutput, register
from .dmd2 import DMD2, DMD2Config, iteration_of, phase_of

MANIFEST = "path.json"
# DMD2 options of the generator's update (and the GAN), which stage 1 never runs
GENERATOR_KEYS = ("generator_lr", "dfake_gen_update_ratio", "real_guidance_scale", "fake_guidance_scale",
                  "min_step_percent", "max_step_percent", "dm_loss_weight", "gen_cls_loss_weight",
                  "guidance_cls_loss_weight", "cls_on_clean_image", "diffusion_gan", "diffusion_gan_max_timestep",
                  "regression_loss_weight")
STAGES = ("both", "degradation", "backtracking")


@dataclass
class DisBackConfig(DMD2Config):
    disback_stage: str = "both"  # both, degradation (stage 1 only) or backtracking (stage 2 only)
    degradation_steps: int = 200  # stage-1 optimizer steps when --disback_stage both
    degradation_interval: int = 50  # save a point of the degradation path every this many stage-1 steps
    interval: int = 100  # stage-2 optimizer steps per target before moving one point toward the teacher
    degradation_path: str | None = None  # folder of the path (default: OUT/degradation_path)

    def validate(self):
        super().validate()
        if self.disback_stage not in STAGES:
            raise ConfigError(f"--disback_stage must be one of {', '.join(STAGES)}")
        for k in ("degradation_steps", "degradation_interval", "interval"):
            if getattr(self, k) < 1:
                raise ConfigError(f"--{k} must be >= 1")
        if self.regression_only:
            raise ConfigError("--regression_only is DMD2's regression stage: run it with --method dmd2, then "
                              "start DisBack's generator from it with --generator_ckpt_path")
        if self.disback_stage == "backtracking" and not self.degradation_path:
            raise ConfigError("--disback_stage backtracking needs --degradation_path (the degradation_path folder "
                              "of a --disback_stage degradation run)")
        if self.disback_stage != "both":
            refuse_changed(self, ("degradation_steps",), f"with --disback_stage {self.disback_stage} (it splits the "
                           "steps of --disback_stage both): drop it")
        if self.disback_stage == "backtracking":
            refuse_changed(self, ("degradation_interval",), "with --disback_stage backtracking (the path exists): "
                           "drop it")
        if self.disback_stage == "degradation":
            refuse_changed(self, ("interval",), "with --disback_stage degradation (no backtracking): drop it")
            refuse_changed(self, GENERATOR_KEYS, "with --disback_stage degradation, which trains no generator (only "
                           "the fake score along the degradation path): drop them")

    def validate_run(self, cfg):
        if self.disback_stage != "degradation":
            return super().validate_run(cfg)
        # Stage 1 alone runs no generator update and no GAN: DMD2's checks of those do not apply.
        if self.fake_score_lora_rank is not None and cfg.cast_teacher_unet:
            raise ConfigError("--cast_teacher_unet has no effect with --fake_score_lora_rank: the teacher's weights "
                              "are always held in the mixed-precision dtype; drop it")
        if self.guidance_lr is not None:
            refuse_changed(cfg, ("learning_rate",), "with --disback_stage degradation and --guidance_lr given (only "
                           "the fake score trains): drop it")
        refuse_changed(cfg, ("use_fix_crop_and_size",), "with --disback_stage degradation: no image carries its size "
                       "(the fake score learns on generator samples); drop it")
        if not self.encodes_images(cfg) and not cfg.cache_dir:
            refuse_changed(cfg, ("vae_encode_batch_size",), "for this stage, which encodes no image: drop it")
        if not cfg.validation_steps:
            refuse_changed(cfg, ("validation_guidance_scale",), "with --validation_steps 0: drop it")

    def encodes_images(self, cfg) -> bool:
        if self.disback_stage == "degradation":  # G's K-step inputs from real latents are the only encode left
            return not cfg.cache_dir and self.num_denoising_step > 1 and not self.backward_simulation
        return super().encodes_images(cfg)

    def uses(self, cfg, bundle=None) -> dict:
        u = super().uses(cfg, bundle)
        u.update(disback_stage=self.disback_stage, degradation_path=self.degradation_path)
        if self.disback_stage == "both":
            u["degradation_steps"] = self.degradation_steps
        if self.disback_stage != "backtracking":
            u["degradation_interval"] = self.degradation_interval
        if self.disback_stage != "degradation":
            u["interval"] = self.interval
        else:
            for k in (*GENERATOR_KEYS, "use_fix_crop_and_size"):
                u.pop(k, None)
            if not self.encodes_images(cfg):
                u.pop("vae_encode_batch_size", None)
            if self.guidance_lr is not None:
                u.pop("learning_rate", None)  # the generator, which alone would read it, is not trained
        return u


class DisBackState:
    """Where the run is: stage, the step stage 2 began at, the target index, the path's files."""

    def __init__(self, method):
        self.method = method
        self.stage, self.stage2_start, self.target_index, self.path = "degradation", 0, 0, []

    def state_dict(self):
        return {"stage": self.stage, "stage2_start": self.stage2_start, "target_index": self.target_index,
                "path": list(self.path)}

    def load_state_dict(self, d):
        self.stage, self.stage2_start = d["stage"], d["stage2_start"]
        self.target_index, self.path = d["target_index"], list(d["path"])
        if self.stage == "backtracking":
            self.method.load_target()


@register
class DisBack(DMD2):
    name = "disback"
    Config = DisBackConfig

    def __init__(self, cfg, mcfg: DisBackConfig, bundle, accelerator):
        super().__init__(cfg, mcfg, bundle, accelerator)
        if mcfg.disback_stage == "both" and mcfg.degradation_steps >= cfg.max_train_steps:
            raise ConfigError(f"--degradation_steps {mcfg.degradation_steps} leaves no backtracking steps: it must be "
                              f"< --max_train_steps {cfg.max_train_steps}")
        self.path_dir = Path(mcfg.degradation_path or Path(cfg.output_dir) / "degradation_path")
        self.state = DisBackState(self)
        if self.lora:
            # The target is a second adapter on the same network: the path holds LoRA deltas only.
            net = bundle.denoiser
            flags = {n: p.requires_grad for n, p in net.named_parameters()}
            r = mcfg.fake_score_lora_rank
            attach_lora(net, r, mcfg.fake_score_lora_alpha or r, 0.0,
                        mcfg.fake_score_lora_target_modules or bundle.lora_targets, adapter="target",
                        flag="--fake_score_lora_target_modules")
            net.set_adapter("default")
            for n, p in net.named_parameters():
                p.requires_grad_(flags.get(n, False))
            self.target_unet = None
        else:
            self.target_unet = frozen_copy(bundle.denoiser)
        if mcfg.disback_stage == "backtracking":
            manifest = self.path_dir / MANIFEST
            if not manifest.is_file():
                raise ConfigError(f"--degradation_path {self.path_dir} has no {MANIFEST}: run --disback_stage "
                                  "degradation first (it writes the folder)")
            info = json.loads(manifest.read_text())
            if info["lora"] != self.lora:
                raise ConfigError(f"the path in {self.path_dir} was recorded {'with' if info['lora'] else 'without'} a "
                                  "LoRA fake score: use the same --fake_score_lora_rank")
            self.state.path = info["points"]
            self.begin_backtracking(0)

    # ---- state -----------------------------------------------------------------------------
    def stateful(self):
        return {**super().stateful(), "disback": self.state}

    def frozen_networks(self):
        return {**super().frozen_networks(), **({"target": self.target_unet} if self.target_unet is not None else {})}

    def stage1_steps(self) -> int:
        m = self.mcfg
        return m.degradation_steps if m.disback_stage == "both" else self.cfg.max_train_steps

    def targets(self) -> list[str | None]:
        """The backtracking targets: the path before its last point, newest first, then the teacher (None)."""
        return list(reversed(self.state.path[:-1])) + [None]

    def phase(self, step):
        if self.state.stage == "degradation":
            return "guidance"  # only s_θ′ learns; the generator stays the initial one
        return phase_of(step - self.state.stage2_start, self.mcfg.dfake_gen_update_ratio)

    def schedule_ticks(self, phase, step):
        # Stage 1 is a loop of fake-score updates (one iteration each); stage 2 is DMD2's loop and clock.
        if self.state.stage == "degradation":
            return {"guidance": 1}
        return super().schedule_ticks(phase, step)

    def schedule_length(self, group):
        S1 = self.stage1_steps() if self.mcfg.disback_stage != "backtracking" else 0
        S2 = self.cfg.max_train_steps - S1
        iters2 = iteration_of(S2 - 1, self.mcfg.dfake_gen_update_ratio) + 1 if S2 > 0 else 0
        if group == "generator":
            return max(iters2, 1)
        return S1 + iters2

    # ---- weights of the path ----------------------------------------------------------------
    def _weights(self, adapter: str) -> dict[str, torch.Tensor]:
        """A path point: the fake score's weights, or its LoRA delta under adapter-free key names, as the
        network holds them (its shards under --fsdp)."""
        if self.lora:
            return {n.replace(f".{adapter}.", "."): p for n, p in adapter_params(self.bundle.denoiser, adapter)}
        return dict(self._fake_unet().state_dict(keep_vars=True))

    def _load_strict(self, file: Path, adapter: str | None) -> None:
        from safetensors.torch import load_file

        sd = load_file(str(file))
        if self.lora:
            own = self._weights(adapter)
        else:
            net = self.target_unet if adapter == "target" else self._fake_unet()
            own = dict(net.state_dict(keep_vars=True))
        missing, unexpected = own.keys() - sd.keys(), sd.keys() - own.keys()
        if missing or unexpected:
            raise RuntimeError(f"{file} does not fit the {adapter!r} {'adapter' if self.lora else 'network'}: missing "
                               f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        copy_into(own, sd)  # (each rank takes its shard of the full weights under --fsdp)

    def save_point(self, step: int) -> None:
        from safetensors.torch import save_file

        name = f"point-{step:07d}.safetensors"
        self.state.path.append(name)
        weights = full_tensors(self._weights("default"))  # (every rank: gathers the shards under --fsdp)
        if self.accelerator.is_main_process:
            self.path_dir.mkdir(parents=True, exist_ok=True)
            save_file({k: v.float().cpu().contiguous() for k, v in weights.items()}, str(self.path_dir / name))
            (self.path_dir / MANIFEST).write_text(json.dumps({"lora": self.lora, "points": self.state.path}) + "\n")
        self.accelerator.wait_for_everyone()

    def load_target(self) -> None:
        """Make the current target the real score (the teacher needs no load: it is the frozen UNet)."""
        target = self.targets()[self.state.target_index]
        if target is not None:
            self._load_strict(self.path_dir / target, "target")

    def begin_backtracking(self, step: int) -> None:
        if not self.state.path:
            raise ConfigError("the degradation path is empty: stage 1 saved no point")
        self.state.stage, self.state.stage2_start, self.state.target_index = "backtracking", step, 0
        self._load_strict(self.path_dir / self.state.path[-1], "default")  # s_φ ← the path's end
        self.load_target()

    def current_target(self) -> str | None:
        return self.targets()[self.state.target_index] if self.state.stage == "backtracking" else None

    # ---- the real score is the current target -------------------------------------------------
    def real_score(self, z, t, cond, w=None):
        if self.current_target() is None:
            return super().real_score(z, t, cond, w)
        if self.lora:
            with active_adapter(self.bundle.denoiser, "target") as net:
                return self.bundle.denoise(net, z, t, cond, w)
        return self.bundle.denoise(self.target_unet, z, t, cond, w)

    def loss(self, phase, batch, step):
        if self.state.stage == "degradation":
            B = len(batch["caption"])
            out = self.guidance_loss(batch, self._cond(batch), B, gan=False)
            return StepOutput(out.loss, {"loss_degradation": out.loss.detach(), "loss": out.loss.detach()})
        return super().loss(phase, batch, step)

    def after_step(self, phase, step):
        st, m = self.state, self.mcfg
        if st.stage == "degradation":
            S1 = self.stage1_steps()
            if step % m.degradation_interval == 0 or step == S1:
                self.save_point(step)
            if step == S1 and m.disback_stage == "both":
                self.begin_backtracking(step)
            return
        s2 = step - st.stage2_start
        if s2 % m.interval == 0 and st.target_index < len(self.targets()) - 1:
            st.target_index += 1
            self.load_target()

    # ---- export ----------------------------------------------------------------------------
    def export(self, out_dir: Path):
        if self.mcfg.disback_stage == "degradation":
            return {"scheduler": type(self.scheduler()).__name__, "num_inference_steps": 1, "guidance_scale": 0.0,
                    "student": False,
                    "guidance_note": f"Stage 1 only: the degradation path is in {self.path_dir} "
                                     f"({len(self.state.path)} points); run --disback_stage backtracking with "
                                     f"--degradation_path {self.path_dir} to train the generator."}
        return super().export(out_dir)
