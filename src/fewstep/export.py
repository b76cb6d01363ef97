"""Outputs users load: a diffusers pipeline folder with the student and its few-step scheduler,
the resolved config, and a model card saying how to sample.

Every export is atomic (:func:`atomic_export`): the files are written to ``OUT/.tmp-export``, checked
(every tensor finite), then moved into ``OUT`` one rename each, ``model_index.json`` last, so a failed
export (a full disk, a kill) never leaves a half-written student that loads.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .training.checkpoint import (
    CheckpointError,
    folder_bytes,
    free_bytes,
    fsync_dir,
    fsync_tree,
    is_disk_full,
    mb,
)

TMP = ".tmp-export"
IN_PROGRESS = ".fewstep-export-in-progress"  # inside TMP while an atomic export writes there
LAST = ("model_index.json",)  # what makes the folder a loadable pipeline goes in last


class ExportError(CheckpointError):
    """The student was not written (nothing trained, a non-finite value, a full disk); exit status 1."""


def check_finite_folder(folder: Path) -> None:
    """Raise :class:`ExportError` naming the first tensor of a ``*.safetensors`` file under ``folder``
    that holds NaN or inf."""
    import torch
    from safetensors import safe_open

    for f in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                t = st.get_tensor(key)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ExportError(
                        f"not exporting: {f.relative_to(folder)} holds {int((~torch.isfinite(t)).sum())} non-finite "
                        f"value(s) in {key!r}; the student is broken (see the run's skipped-step summary). "
                        "Checkpoints are kept: resume from an earlier one with a lower --learning_rate")


def atomic_export(out_dir: Path, write: Callable[[Path], Any]) -> Any:
    """Run ``write(tmp)`` into ``out_dir/.tmp-export``, check every tensor is finite, then move each
    entry into ``out_dir`` (``model_index.json`` last). On failure the temporary folder is removed and
    ``out_dir`` is as before; a full disk is reported with the free space. Returns what ``write`` did."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp, old = out / TMP, out / ".old-export"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.mkdir()
        (tmp / IN_PROGRESS).write_text("")
        result = write(tmp)
        (tmp / IN_PROGRESS).unlink()
        check_finite_folder(tmp)
        fsync_tree(tmp)
    except ExportError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        written, free = folder_bytes(tmp), free_bytes(out)
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(e, free, written + 1):
            raise ExportError(
                f"disk full while writing the student to {tmp} (removed; {out} is as before): {mb(free_bytes(out))} "
                f"free on its file system, and the student needs more than the {mb(written)} written when the disk "
                "filled. Free space, then run the same command (with --resume_from_checkpoint latest a finished "
                "run only exports)") from None
        raise
    names = sorted(p.name for p in tmp.iterdir())
    for name in [n for n in names if n not in LAST] + [n for n in LAST if n in names]:
        src, dst = tmp / name, out / name
        if dst.is_dir() and not dst.is_symlink():  # a directory cannot be replaced in one rename
            old.mkdir(exist_ok=True)
            os.replace(dst, old / name)
        os.replace(src, dst)
    fsync_dir(out)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return result


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def export_pipeline(bundle, unet, scheduler, out_dir: Path, vae_override: str | None = None) -> None:
    """Write ``out_dir`` as a diffusers pipeline folder: the trained denoiser and scheduler are saved,
    the frozen parts (tokenizer, text encoder, VAE, ...) copied byte-for-byte from the teacher, so
    training in fp16 never degrades them. Atomic (:func:`atomic_export`) unless it is already part
    of one."""
    out_dir = Path(out_dir)
    if not (out_dir / IN_PROGRESS).is_file():
        return atomic_export(out_dir, lambda d: export_pipeline(bundle, unet, scheduler, d, vae_override))
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(bundle.root)
    index = json.loads((root / "model_index.json").read_text())
    denoiser = getattr(bundle, "denoiser_name", "unet")  # "transformer" for SD3
    for name in list(index):
        if name.startswith("_") or name in (denoiser, "scheduler"):
            continue
        if name in ("safety_checker", "feature_extractor", "image_encoder"):
            index[name] = [None, None]
            continue
        src = Path(vae_override) if (name == "vae" and vae_override) else root / name
        if (src / "vae" / "config.json").is_file():  # a VAE given as a pipeline folder
            src = src / "vae"
        if src.is_dir():
            shutil.copytree(src, out_dir / name, dirs_exist_ok=True)
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    unet.save_pretrained(out_dir / denoiser)
    scheduler.save_pretrained(out_dir / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_model_card(out_dir: Path, teacher: str, method: str, facts: dict[str, Any], metrics: dict | None = None):
    steps = facts.get("num_inference_steps", 4)
    gs = facts.get("guidance_scale", 1.0)
    gs_num = gs
    hints = {"num_inference_steps": steps, "guidance_scale": gs}
    if facts.get("sampler"):  # students trained for one scheduler and step count (direct distillation)
        hints["sampler"] = facts["sampler"]
    ts_arg = ""
    if facts.get("timesteps"):  # a scheduler grid that cannot express the training timesteps
        hints["timesteps"] = facts["timesteps"]
        ts_arg = f", timesteps={facts['timesteps']}"
    _write_text(Path(out_dir) / "fewstep_sampling.json", json.dumps(hints) + "\n")
    sched = facts.get("scheduler", "LCMScheduler")
    if facts.get("lora"):  # no model_index.json here: the base model, then the adapter and its scheduler
        load = (f'pipe = DiffusionPipeline.from_pretrained("{teacher}")\n'
                f'pipe.load_lora_weights("{out_dir}", weight_name="pytorch_lora_weights.safetensors")\n'
                f'pipe.scheduler = {sched}.from_pretrained("{out_dir}", subfolder="scheduler")')
    else:
        load = (f'pipe = DiffusionPipeline.from_pretrained("{out_dir}")\n'
                f'pipe.scheduler = {sched}.from_config(pipe.scheduler.config)')
    card = f"""---
library_name: diffusers
base_model: {teacher}
tags: [fewstep, {method}, text-to-image, few-step]
---
# Few-step student distilled with fewstep ({method})

Teacher: `{teacher}`. Scheduler: `{facts.get('scheduler', 'LCMScheduler')}`,
{steps} steps recommended (1–8 work). Guidance scale: {gs}.
{facts.get('guidance_note', '')}

```python
import torch
from diffusers import DiffusionPipeline, {sched}

{load}
image = pipe("a prompt", num_inference_steps={steps}, guidance_scale={gs_num}{ts_arg}).images[0]
```

or `fewstep sample --model {out_dir} --prompt "a prompt" --num_inference_steps {steps}`.
The full training configuration is in `fewstep_config.yaml`.
"""
    if metrics:
        card += "\n## Evaluation\n\n" + json.dumps(metrics, indent=2) + "\n"
    _write_text(Path(out_dir) / "README.md", card)
