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

HALF = ("F16", "BF16")


def upcast_half_weights(folder: Path) -> bool:
    """Rewrite a model folder's half-precision safetensors weights in fp32 (lossless); True if any was.

    transformers ≥ 5 loads a model in the dtype its files are stored in, while diffusers loads its models
    in fp32 unless told otherwise: an fp16 text encoder next to an fp32 UNet then fails in vanilla
    ``DiffusionPipeline.from_pretrained(...)`` on the CPU (Half != float). With every file in fp32 the
    folder loads in one dtype by default, and ``.to("cuda", torch.float16)`` still gives fp16 on a GPU."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = False
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            meta = s.metadata()
            if not any(s.get_slice(k).get_dtype() in HALF for k in s.keys()):
                continue
            tensors = {k: s.get_tensor(k) for k in s.keys()}
        tensors = {k: v.float() if v.dtype in (torch.float16, torch.bfloat16) else v for k, v in tensors.items()}
        mode = f.stat().st_mode & 0o777
        save_file(tensors, str(f), metadata=meta)
        f.chmod(mode)  # (safetensors creates the file owner-only)
        changed = True
    cfg = Path(folder) / "config.json"
    if changed and cfg.is_file():
        d = json.loads(cfg.read_text())
        for key in ("dtype", "torch_dtype"):  # transformers records the stored dtype here
            if key in d:
                d[key] = "float32"
        cfg.write_text(json.dumps(d, indent=2) + "\n")
    return changed



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
    the frozen parts (tokenizer, text encoder, VAE, ...) copied from the teacher without loss (text
    encoders stored in half precision are written in fp32, see :func:`upcast_half_weights`), so training
    in fp16 never degrades them. Atomic (:func:`atomic_export`) unless it is already part of one."""
    out_dir = Path(out_dir)
    if not (out_dir / IN_PROGRESS).is_file():
        return atomic_export(out_dir, lambda d: export_pipeline(bundle, unet, scheduler, d, vae_override))
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(bundle.root)
    index = json.loads((root / "model_index.json").read_text())
    denoiser = bundle.denoiser_name
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
            if isinstance(index[name], list) and index[name][0] == "transformers":
                upcast_half_weights(out_dir / name)
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    unet.save_pretrained(out_dir / denoiser)
    scheduler.save_pretrained(out_dir / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def steps_phrase(valid_steps) -> str:
    """"exactly 1 step", "1–4 steps": the step counts a student was trained for."""
    lo, hi = valid_steps
    return f"exactly {lo} step{'s' if lo > 1 else ''}" if lo == hi else f"{lo}–{hi} steps"


def model_card(out_dir: Path, teacher: str | None, method: str, facts: dict[str, Any], load_args: str = "",
               call_kwargs: dict | None = None, guidance_arg: bool = True) -> str:
    """The model card (README.md) of an output folder, from the method's export facts:
    ``num_inference_steps`` (recommended), ``valid_steps`` ((lo, hi): the step counts the model was
    trained for), ``guidance_scale``, ``scheduler``, optional ``timesteps`` (with ``timestep_kwargs``: the
    form the family's pipeline takes them in, e.g. ``sigmas=`` for flow schedulers), ``lora``,
    ``guidance_note``, ``title``, and ``student: False`` for a run that wrote no model (then the card has no
    code). ``load_args``: the extra ``from_pretrained`` arguments the family's folders need
    (:meth:`ModelBundle.card_load_args`); ``call_kwargs``: pipeline-call arguments its conditioning depends
    on (:meth:`ModelBundle.call_kwargs`) and those of its guidance (:meth:`ModelBundle.guidance_call_kwargs`);
    ``guidance_arg``: whether the call passes ``guidance_scale`` (:attr:`ModelBundle.pipeline_guidance_scale`)."""
    steps = facts.get("num_inference_steps", 4)
    gs = facts.get("guidance_scale", 1.0)
    sched = facts.get("scheduler", "LCMScheduler")
    valid = facts.get("valid_steps")
    trained = f"Trained for {steps_phrase(valid)}; {steps} recommended." if valid else f"{steps} steps recommended."
    base = f"base_model: {teacher}\n" if teacher else ""
    title = facts.get("title", "Few-step student distilled with fewstep")
    origin = f"Teacher: `{teacher}`. " if teacher else ""
    head = f"""---
library_name: diffusers
{base}tags: [fewstep, {method}, text-to-image, few-step]
---
# {title} ({method})

{origin}Scheduler: `{sched}`. {trained} Guidance scale: {gs}.
{facts.get('guidance_note', '')}
"""
    if facts.get("student") is False:
        return head + "\nThis run wrote no model to sample. The full training configuration is in `fewstep_config.yaml`.\n"
    ts_arg = ""
    if facts.get("timesteps"):  # a scheduler grid that cannot express the training timesteps
        ts_arg = "".join(f", {k}={v}" for k, v in facts.get("timestep_kwargs", {"timesteps": facts["timesteps"]}).items())
    ts_arg += "".join(f", {k}={v!r}" for k, v in (call_kwargs or {}).items())
    gs_arg = f", guidance_scale={gs}" if guidance_arg else ""
    if facts.get("lora"):  # no model_index.json here: the base model, then the adapter and its scheduler
        load = (f'pipe = DiffusionPipeline.from_pretrained("{teacher}"{load_args})\n'
                f'pipe.load_lora_weights("{out_dir}", weight_name="pytorch_lora_weights.safetensors")\n'
                f'pipe.scheduler = {sched}.from_pretrained("{out_dir}", subfolder="scheduler")')
    else:
        load = (f'pipe = DiffusionPipeline.from_pretrained("{out_dir}"{load_args})\n'
                f'pipe.scheduler = {sched}.from_config(pipe.scheduler.config)')
    # One dtype for every part, whatever each file stores: fp16 on a GPU, fp32 on the CPU (where half
    # precision is slow or unsupported).
    return head + f"""
```python
import torch
from diffusers import DiffusionPipeline, {sched}

{load}
device, dtype = ("cuda", torch.float16) if torch.cuda.is_available() else ("cpu", torch.float32)
pipe = pipe.to(device, dtype)
image = pipe("a prompt", num_inference_steps={steps}{gs_arg}{ts_arg}).images[0]
```

or `fewstep sample --model {out_dir} --prompt "a prompt" --num_inference_steps {steps}`.
The full training configuration is in `fewstep_config.yaml`.
"""


def write_model_card(out_dir: Path, teacher: str | None, method: str, facts: dict[str, Any],
                     metrics: dict | None = None, load_args: str = "", call_kwargs: dict | None = None,
                     guidance_arg: bool = True):
    """``README.md`` (the model card) and ``fewstep_sampling.json`` (what `fewstep sample` / `eval` read);
    ``load_args``, ``call_kwargs`` and ``guidance_arg`` as in :func:`model_card`."""
    hints = {"num_inference_steps": facts.get("num_inference_steps", 4), "guidance_scale": facts.get("guidance_scale", 1.0)}
    if facts.get("valid_steps"):
        hints["valid_steps"] = list(facts["valid_steps"])
    if facts.get("sampler"):  # students trained for one scheduler and step count (direct distillation)
        hints["sampler"] = facts["sampler"]
    if facts.get("timesteps"):  # a scheduler grid that cannot express the training timesteps
        hints["timesteps"] = facts["timesteps"]
    if call_kwargs:  # pipeline-call arguments the family's conditioning depends on (SD3's max_sequence_length)
        hints["pipeline_kwargs"] = dict(call_kwargs)
    _write_text(Path(out_dir) / "fewstep_sampling.json", json.dumps(hints) + "\n")
    card = model_card(out_dir, teacher, method, facts, load_args, call_kwargs, guidance_arg)
    if metrics:
        card += "\n## Evaluation\n\n" + json.dumps(metrics, indent=2) + "\n"
    _write_text(Path(out_dir) / "README.md", card)
