"""The refusals a run makes before it loads a model, shared by the run and ``--dry_run``.

The trainer calls :func:`check_run` before it creates anything (no output folder, no logs, no
config), then :func:`check_teacher` once the teacher's family is known; ``--dry_run`` calls the same
two on the teacher's configs. One code path, so the dry run refuses exactly what the run refuses:
optional packages, the output folder of another run, a resume under other settings, data the run
would stop on (it skips a bad first sample, as the run does), and what the teacher's family rules out.
"""

from __future__ import annotations

import logging
import socket
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from ..config import ConfigError, RunSpec, TrainConfig

log = logging.getLogger("fewstep")

# The run judges its data after this many samples (trainer._next_batch): more than --max_bad_fraction bad stops it.
JUDGE_AFTER = 64


@dataclass
class DataCheck:
    dataset: Any
    sample: dict  # the first usable sample, in the order the run's first epoch reads them
    seen: int = 0  # samples read to decide
    skipped: Counter = field(default_factory=Counter)  # bad samples among them, by cause
    pipes: list = field(default_factory=list)  # pipe: shard commands a dry run did not run


def check_packages(cfg: TrainConfig, cuda: bool) -> None:
    """Optional packages the settings need. Where one only makes a step faster or leaner and cannot run on
    this machine, the run goes on without it and says so (recorded in the resolved config)."""
    if cfg.report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(f"--report_to {cfg.report_to} needs wandb: pip install 'fewstep[wandb]' "
                              "(or --report_to tensorboard)") from None
    if cfg.push_to_hub:
        try:
            import huggingface_hub  # noqa: F401
        except ImportError:
            raise ConfigError("--push_to_hub needs huggingface_hub: pip install huggingface_hub") from None
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes  # noqa: F401
            have = True
        except ImportError:
            have = False
        if cuda and not have:
            raise ConfigError("--use_8bit_adam needs bitsandbytes: pip install 'fewstep[8bit]' (or drop the flag)")
        if not cuda:
            # bitsandbytes' 8-bit AdamW is a CUDA kernel; on this machine the optimizer keeps fp32 states.
            log.warning("--use_8bit_adam: no CUDA device, so torch's AdamW (32-bit states) is used")
            cfg.use_8bit_adam = False
    if cfg.enable_xformers_memory_efficient_attention:
        try:
            import xformers  # noqa: F401
        except ImportError:
            # PyTorch's scaled_dot_product_attention (diffusers' default) computes the same attention with
            # its own memory-efficient kernels; xformers is a speed option only.
            log.warning("--enable_xformers_memory_efficient_attention: xformers is not installed, PyTorch's "
                        "scaled-dot-product attention is used (same result)")
            cfg.enable_xformers_memory_efficient_attention = False


def wandb_reachable(timeout: float = 3.0) -> bool:
    """Whether the wandb server answers a TCP connection (WANDB_BASE_URL or api.wandb.ai)."""
    import os

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_output_dir(cfg: TrainConfig) -> None:
    from .checkpoint import previous_run

    if cfg.resume_from_checkpoint or cfg.overwrite_output_dir:
        return
    found = previous_run(Path(cfg.output_dir))
    if found:
        raise ConfigError(
            f"--output_dir {cfg.output_dir} holds another run ({found}); a new run there would overwrite its "
            "export and mix its checkpoints with the new ones. Continue it with --resume_from_checkpoint latest, "
            "start over there with --overwrite_output_dir (deletes them), or give another --output_dir")


def check_resume(spec: RunSpec) -> Path | None:
    """The checkpoint a resume would most likely load (the newest complete one, or the folder named),
    refused when its run had other trainable settings. Its bytes are verified later, by the run's main
    process alone (training/checkpoint.py: resolve_resume), which may then fall back to an older one."""
    from .checkpoint import TRAINER_RESUME_KEYS, check_resume_settings, list_checkpoints

    cfg = spec.train
    if cfg.resume_from_checkpoint and cfg.overwrite_output_dir:
        raise ConfigError("--overwrite_output_dir deletes the checkpoints --resume_from_checkpoint would continue: "
                          "give one of them")
    if not cfg.resume_from_checkpoint:
        return None
    out = Path(cfg.output_dir)
    if cfg.resume_from_checkpoint == "latest":
        found = list_checkpoints(out)
        resume = found[-1][1] if found else None
    else:
        resume = Path(cfg.resume_from_checkpoint)
        if not resume.is_absolute() and not resume.exists():
            resume = out / cfg.resume_from_checkpoint
        resume = resume if resume.is_dir() else None  # (a missing folder: the run names it with the others)
    if resume:
        keys = TRAINER_RESUME_KEYS + tuple(getattr(spec.method_cls, "resume_keys", ()))
        check_resume_settings(resume, spec.to_dict(), keys)
    return resume


def check_data(cfg: TrainConfig, order: Callable[[int, int], Iterable[int]] | None = None,
               world: int = 1, dry: bool = False) -> DataCheck:
    """Read samples as the run's first epoch would (``order(n, seed)``: its sampler's indices) until the
    first usable one, and at least the first :data:`JUDGE_AFTER` of them; refuse what the run would stop
    on: no usable sample, or more than ``--max_bad_fraction`` of those samples bad. A bad first sample
    alone is skipped, as the run skips it."""
    from ..data import build_dataset

    ds = build_dataset(cfg)
    pipes = ds.drop_pipes() if dry and hasattr(ds, "drop_pipes") else []  # shell commands: a dry run never runs them
    if pipes and not ds.units:
        return DataCheck(ds, {}, pipes=pipes)
    is_map = not isinstance(ds, torch.utils.data.IterableDataset)
    need = cfg.train_batch_size * world
    if is_map and len(ds) < need:  # the run drops incomplete batches: it would never make a step
        raise ConfigError(
            f"the data set holds {len(ds)} samples, fewer than one batch of --train_batch_size "
            f"{cfg.train_batch_size} per process x {world} process(es) = {need}, so every batch would be dropped "
            f"(incomplete batches are): lower --train_batch_size to at most {len(ds) // world} or add data")
    items = (ds[i] for i in (order(len(ds), cfg.seed) if order else range(len(ds)))) if is_map else iter(ds)
    check = DataCheck(ds, {}, pipes=pipes)
    example = None
    for s in items:
        check.seen += 1
        if "_bad" in s:
            check.skipped[s["_bad"]] += 1
            example = example or s.get("_where")
        elif not check.sample:
            check.sample = s
        if check.sample and check.seen >= JUDGE_AFTER:
            break
        if check.seen >= JUDGE_AFTER and cfg.max_bad_fraction < 1:
            break
    bad = sum(check.skipped.values())
    causes = ", ".join(f"{n} {c}" for c, n in check.skipped.most_common()) or "none"
    hint = ("Check the data path, the caption files (.txt or --caption_extension) / --caption_column, and "
            f"--train_batch_size against the data set size. Skipped by cause: {causes}; example: {example or '-'}")
    if check.seen >= JUDGE_AFTER and bad > cfg.max_bad_fraction * check.seen:
        raise ConfigError(f"{bad} of the first {check.seen} samples are unusable (more than --max_bad_fraction "
                          f"{cfg.max_bad_fraction}), so the run would stop. {hint}")
    if not check.sample:
        raise ConfigError(f"the data holds no usable sample ({check.seen} read). {hint}")
    if cfg.extra_inputs:
        have = set(check.sample.get("meta", {}))
        missing = [c for c in cfg.extra_inputs if c not in have]
        if missing:
            raise ConfigError(f"--extra_inputs {','.join(cfg.extra_inputs)}: the data has no column "
                              f"{', '.join(missing)} (its other columns: {', '.join(sorted(have)) or 'none'})")
    return check


def check_run(spec: RunSpec, order: Callable[[int, int], Iterable[int]] | None = None,
              dry: bool = False) -> DataCheck:
    """Every refusal that needs no model: packages, output folder, resume settings, compile, data."""
    import os

    from .speed import check_compile

    cfg = spec.train
    cuda = torch.cuda.is_available()
    check_packages(cfg, cuda)
    check_compile(cfg, "cuda" if cuda else "cpu")
    check_output_dir(cfg)
    check_resume(spec)
    return check_data(cfg, order, int(os.environ.get("WORLD_SIZE", "1")), dry)


def text_lengths(bundle) -> list[tuple[Any, int | None]]:
    """(tokenizer, its text encoder's position limit) pairs of a bundle, whatever the family calls them:
    the n-th tokenizer part goes with the n-th text encoder part."""
    from transformers import PreTrainedTokenizerBase

    parts = getattr(bundle, "parts", {})
    toks = [v for k, v in sorted(parts.items()) if isinstance(v, PreTrainedTokenizerBase)]
    encs = [v for k, v in sorted(parts.items()) if k.startswith("text_encoder") and v is not None]
    limits = []
    for enc in encs:
        conf = getattr(enc, "config", enc)  # a model, or (dry run) its config
        limit = conf.get("max_position_embeddings") if isinstance(conf, dict) else \
            getattr(conf, "max_position_embeddings", None)
        limits.append(limit)
    return [(t, limits[i] if i < len(limits) else None) for i, t in enumerate(toks)]


def check_teacher(spec: RunSpec, bundle) -> None:
    """Refusals that need the teacher's family and configs (weights or not): the method's own, the
    preset's family, PaddleMIX's family flag, and --model_max_length against the text encoders."""
    import dataclasses

    from ..methods import REGISTRY
    from ..runspec import check_preset_family

    cfg = spec.train
    family = getattr(bundle, "family", None)  # (a method may hold no bundle)
    check_preset_family(cfg, family)  # (first: a preset of another family explains the refusals below)
    REGISTRY[cfg.method].check_setup(cfg, spec.method, bundle)
    if bundle is not None:
        from ..config import check_teacher_settings

        check_teacher_settings(spec, bundle)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if (f.metadata.get("family_flag") and value is not None and family is not None
                and value != (f.name in bundle.family_flags)):
            raise ConfigError(f"--{f.name} {value}: {cfg.pretrained_teacher_model} is a {family} teacher "
                              f"(from its model_index.json); fewstep picks the family itself: drop --{f.name}")
    if bundle is not None and isinstance(bundle.denoiser, dict):
        # (with weights loaded, the method checks them itself)
        check_lora_targets(spec.method, bundle.denoiser, list(bundle.lora_targets))
    if cfg.model_max_length is not None and bundle is not None:
        for tok, limit in text_lengths(bundle):
            if limit is not None and cfg.model_max_length > limit:
                raise ConfigError(f"--model_max_length {cfg.model_max_length}: the teacher's text encoder reads at "
                                  f"most {limit} tokens")
            if cfg.cache_dir and cfg.model_max_length != tok.model_max_length:
                raise ConfigError(f"--model_max_length {cfg.model_max_length}: the text embeddings in --cache_dir were "
                                  f"computed at the tokenizer's {tok.model_max_length} tokens; drop the flag")


def check_lora_targets(mcfg, denoiser_config: dict, default_targets: list[str] | None = None) -> None:
    """The LoRA target names a method config will use (``<x>lora_target_modules`` with its ``<x>lora_rank``
    set, or LCM's ``--is_lora``) against the denoiser's module names, on a weightless (meta-device) copy
    built from its config: the dry run's version of the check the method makes on the loaded model. Unset
    target lists mean the family's ``default_targets``."""
    import dataclasses

    import diffusers

    from ..models.lora import check_targets

    used = []
    for f in dataclasses.fields(mcfg):
        if f.name.endswith("lora_target_modules"):
            prefix = f.name[: -len("lora_target_modules")]
            if getattr(mcfg, prefix + "lora_rank", None) is not None or (not prefix and getattr(mcfg, "lora", False)):
                used.append(f.name)
    cls = getattr(diffusers, str(denoiser_config.get("_class_name")), None)
    if not used or cls is None:
        return
    with torch.device("meta"):
        model = cls.from_config(denoiser_config)
    for name in used:
        check_targets(model, list(getattr(mcfg, name) or default_targets or []), "--" + name)


def apply_text_length(cfg: TrainConfig, bundle) -> None:
    """--model_max_length: every tokenizer of the teacher pads and truncates prompts to it (PaddleMIX)."""
    if cfg.model_max_length is not None and bundle is not None:
        for tok, _ in text_lengths(bundle):
            tok.model_max_length = cfg.model_max_length
