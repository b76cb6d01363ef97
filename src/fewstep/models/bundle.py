"""Loading a teacher: the family factory, and the names methods and commands import from models/.

:func:`load_bundle` reads a folder's ``model_index.json`` and hands it to the first family module in
:data:`FAMILIES` whose ``matches`` accepts it; a pipeline no family accepts is refused by name (a SANA
or Kandinsky folder is not silently taken for a Stable Diffusion UNet). A fewstep LoRA folder loads
its base model with the LoRA fused in. The interface every family implements is
:class:`fewstep.models.base.ModelBundle`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from ..config import ConfigError
from .base import (  # noqa: F401  (the names methods and commands import)
    Cond,
    ModelBundle,
    cat_cond,
    check_teacher_path,
    free_disk_bytes,
    frozen_copy,
    net_config,
    weight_dtype_of,
)

# Family modules of this package, each with one ModelBundle subclass, tried in this order (the more
# specific pipelines first: an SDXL folder also has a "unet").
FAMILIES = [("sd3", "SD3Bundle"), ("flux", "FluxBundle"), ("qwenimage", "QwenImageBundle"), ("sdxl", "SDXLBundle"),
            ("sd", "SDBundle")]


def family_classes() -> list[type[ModelBundle]]:
    return [getattr(importlib.import_module(f"{__package__}.{mod}"), name) for mod, name in FAMILIES]



def family_of(root: str) -> type[ModelBundle]:
    """The bundle class of a diffusers folder, from its model_index.json alone (no weights read)."""
    p = Path(root) / "model_index.json"
    index = json.loads(p.read_text()) if p.is_file() else {}
    for cls in family_classes():
        if cls.matches(index):
            return cls
    known = ", ".join(c.pipeline_class for c in family_classes())
    raise ConfigError(f"{root}: {index.get('_class_name', 'this pipeline')} is not a family fewstep supports "
                      f"(supported: {known}); docs/ADDING.md says how to add one")


def teacher_family(path: str, revision: str | None = None) -> str:
    """The family label of a teacher folder (a LoRA folder: of its base model), from model_index.json
    alone: what config resolution needs to pick the family's recipe defaults before any weight loads."""
    from .lora import META_FILE, is_lora_folder

    if is_lora_folder(path):
        return teacher_family(json.loads((Path(path) / META_FILE).read_text())["base_model"], revision)
    return family_of(check_teacher_path(path, revision)).family


def load_bundle(path: str, **kw) -> ModelBundle:
    """The teacher (or a student folder) as a bundle of its family. Keyword arguments are those of
    :meth:`ModelBundle.load`; ``use_fix_crop_and_size`` reaches families with micro-conditioning only."""
    from .lora import META_FILE, fuse_into, is_lora_folder

    if is_lora_folder(path):
        meta = json.loads((Path(path) / META_FILE).read_text())
        bundle = load_bundle(meta["base_model"], **kw)
        if kw.get("weights", True):
            fuse_into(bundle, path)
        sched = Path(path) / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            bundle.scheduler_config = json.loads(sched.read_text())
        return bundle
    root = check_teacher_path(path, kw.get("revision"))
    cls = family_of(root)
    if not cls.micro_conditioning and kw.pop("use_fix_crop_and_size", False):
        import logging

        logging.getLogger("fewstep").warning("--use_fix_crop_and_size only applies to teachers with micro-"
                                             "conditioning; %s has none", root)
    return cls.load(path, **kw)


def arch_presets() -> dict[str, type[ModelBundle]]:
    """Every architecture preset of `fewstep train-teacher`, with the family that builds it."""
    return {name: cls for cls in family_classes() for name in getattr(cls, "ARCH_PRESETS", {})}


def new_bundle(preset: str, tokenizer_dir: Path, seed: int, prediction_type: str | None = None,
               vae_from: str | None = None) -> ModelBundle:
    """A teacher with random weights from an architecture preset; ``vae_from``: a diffusers folder (or
    VAE folder) whose trained VAE the new teacher reuses."""
    cls = arch_presets()[preset]
    vae = None
    if vae_from:
        from diffusers import AutoencoderKL

        root = Path(vae_from)
        vae = AutoencoderKL.from_pretrained(str(root / "vae") if (root / "vae" / "config.json").is_file() else str(root))
        vae.requires_grad_(False).eval()
    return cls.from_scratch(preset, Path(tokenizer_dir), seed, prediction_type, vae=vae)
