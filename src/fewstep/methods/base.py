"""The method protocol: what the trainer needs from a distillation method, and nothing more.

A method owns its networks and its math. The trainer owns the loop: it builds one optimizer per
trainable group, asks :meth:`Method.phase` which group a step updates, calls :meth:`Method.loss`,
steps that group's optimizer, then calls :meth:`Method.after_step`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available as ``--method <cls.name>``."""
    REGISTRY[cls.name] = cls
    return cls


@dataclass
class Group:
    """A trainable group: its module (prepared by accelerate) and optimizer settings."""

    module: torch.nn.Module
    lr: float | None = None  # None: --learning_rate
    params: list[torch.nn.Parameter] | None = None  # None: every parameter that requires grad


@dataclass
class StepOutput:
    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # detached scalars to log


class Method:
    name: ClassVar[str]
    Config: ClassVar[type]
    needs_teacher: ClassVar[bool] = True  # --pretrained_teacher_model is required
    # This method's settings that decide which parameters are trained and how the optimizer state is laid
    # out: a checkpoint written under other values is refused on resume (the trainer adds its own keys).
    resume_keys: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def memory_hints(cls, cfg, mcfg) -> list[str]:
        """Extra lines for the out-of-memory message: this method's own ways to use less memory."""
        return []

    @classmethod
    def check_setup(cls, cfg, mcfg, bundle) -> None:
        """Refusals that need only the settings and the teacher's capabilities: ``bundle`` is the teacher
        loaded without weights (configs only; None for methods without a teacher). Run by ``--dry_run``
        and by the trainer before any weight loads (:meth:`preflight`)."""

    @classmethod
    def preflight(cls, cfg, mcfg):
        """The teacher's configs (no weights) checked against the settings; returns that light bundle."""
        if not cls.needs_teacher:
            cls.check_setup(cfg, mcfg, None)
            return None
        from ..models.bundle import load_bundle

        light = load_bundle(cfg.pretrained_teacher_model, revision=cfg.teacher_revision,
                            vae_path=cfg.pretrained_vae_model_name_or_path, weights=False)
        cls.check_setup(cfg, mcfg, light)
        return light

    @classmethod
    def make_bundle(cls, cfg, mcfg):
        """The models this method starts from: by default the teacher folder, weights loaded (fp32)."""
        from ..models.bundle import load_bundle

        if cfg.cache_dir:
            from ..data.cache import check_cache

            check_cache(cfg)  # made for this teacher and transform, before the weights load
        bundle = load_bundle(cfg.pretrained_teacher_model, revision=cfg.teacher_revision,
                             vae_path=cfg.pretrained_vae_model_name_or_path,
                             vae_encode_batch_size=cfg.vae_encode_batch_size,
                             use_fix_crop_and_size=cfg.use_fix_crop_and_size,
                             text_encoders=not cfg.cache_dir)
        if cfg.cache_dir:  # latents and text embeddings come from `fewstep cache`
            from ..data.cache import load_text_cache

            bundle.use_cache(load_text_cache(cfg.cache_dir))
        return bundle

    def __init__(self, cfg, mcfg, bundle, accelerator):
        self.cfg, self.mcfg, self.bundle, self.accelerator = cfg, mcfg, bundle, accelerator

    def groups(self) -> dict[str, Group]:
        """Trainable groups by name; the trainer replaces ``module`` with the prepared module."""
        raise NotImplementedError

    def bind(self, prepared: dict[str, torch.nn.Module]) -> None:
        """Receive the accelerate-prepared (DDP/FSDP-wrapped) modules, in ``groups()`` order."""
        for name, module in prepared.items():
            setattr(self, name, module)

    def phase(self, step: int) -> str:
        """Which group this optimizer step updates."""
        return next(iter(self.groups()))

    def loss(self, phase: str, batch: dict[str, Any], step: int) -> StepOutput:
        raise NotImplementedError

    def after_step(self, phase: str, step: int) -> None:
        """Called after each optimizer step (EMA updates, target switches)."""

    def schedule_ticks(self, phase: str, step: int) -> dict[str, int]:
        """How far each group's learning-rate schedule advances after optimizer step ``step`` (which
        updated ``phase``), in the clock of the reference algorithm (its iterations). Default: a group's
        schedule counts its own updates."""
        return {phase: 1}

    def schedule_length(self, group: str) -> int:
        """The number of ticks of ``group``'s schedule over the whole run (where linear / cosine schedules
        reach zero). Default: --max_train_steps."""
        return self.cfg.max_train_steps

    def stateful(self) -> dict[str, Any]:
        """Extra objects with state_dict/load_state_dict that checkpoints must hold (EMA targets)."""
        return {}

    def sample(self, prompts: list[str], seeds: list[int], num_inference_steps: int,
               guidance_scale: float) -> torch.Tensor:
        """Images in [0, 1] from the current student, the way users will sample it."""
        raise NotImplementedError

    def trained_steps(self) -> tuple[int, int] | None:
        """(lo, hi): the sampling step counts the student is trained for (every denoiser call at a
        timestep it was trained at); None: any. Validation grids show only these; cards state them."""
        return None

    def export(self, out_dir: Path) -> dict[str, Any]:
        """Write the student in the formats users load; return model-card facts (``valid_steps``:
        :meth:`trained_steps`)."""
        raise NotImplementedError
