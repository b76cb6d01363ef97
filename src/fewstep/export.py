"""Outputs users load: a diffusers pipeline folder with the student and its few-step scheduler,
the resolved config, and a model card saying how to sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def export_pipeline(bundle, unet, scheduler, out_dir: Path, vae_override: str | None = None) -> None:
    """Write ``out_dir`` as a diffusers pipeline folder: the trained denoiser and scheduler are saved,
    the frozen parts (tokenizer, text encoder, VAE, ...) copied byte-for-byte from the teacher, so
    training in fp16 never degrades them."""
    out_dir = Path(out_dir)
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
    if "requires_safety_checker" in index:
        index["requires_safety_checker"] = False
    unet.save_pretrained(out_dir / denoiser)
    scheduler.save_pretrained(out_dir / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_model_card(out_dir: Path, teacher: str, method: str, facts: dict[str, Any], metrics: dict | None = None,
                     load_args: str = "", call_kwargs: dict | None = None, guidance_kwargs=None):
    """README.md with a code block that runs as written, and fewstep_sampling.json. ``load_args``: the
    extra ``from_pretrained`` arguments the family's folders need (:meth:`ModelBundle.card_load_args`);
    ``call_kwargs``: pipeline-call arguments its conditioning depends on (:meth:`ModelBundle.call_kwargs`);
    ``guidance_kwargs(scale)``: the pipeline-call arguments of a CFG scale (:meth:`ModelBundle.
    guidance_call_kwargs`; default ``guidance_scale=scale``)."""
    steps = facts.get("num_inference_steps", 4)
    gs = facts.get("guidance_scale", 1.0)
    gs_num = gs
    hints = {"num_inference_steps": steps, "guidance_scale": gs}
    if facts.get("sampler"):  # students trained for one scheduler and step count (direct distillation)
        hints["sampler"] = facts["sampler"]
    ts_arg = ""
    if facts.get("timesteps"):  # a scheduler grid that cannot express the training timesteps
        hints["timesteps"] = facts["timesteps"]
        # in the form the family's pipeline takes them (timesteps=, or sigmas= for flow schedulers)
        ts_arg = "".join(f", {k}={v}" for k, v in facts.get("timestep_kwargs", {"timesteps": facts["timesteps"]}).items())
    if call_kwargs:
        hints["pipeline_kwargs"] = dict(call_kwargs)
        ts_arg += "".join(f", {k}={v!r}" for k, v in call_kwargs.items())
    (Path(out_dir) / "fewstep_sampling.json").write_text(json.dumps(hints) + "\n")
    sched = facts.get("scheduler", "LCMScheduler")
    guidance = guidance_kwargs(gs_num) if guidance_kwargs else {"guidance_scale": gs_num}
    guidance_arg = "".join(f", {k}={v!r}" for k, v in guidance.items())
    if facts.get("lora"):  # no model_index.json here: the base model, then the adapter and its scheduler
        load = (f'pipe = DiffusionPipeline.from_pretrained("{teacher}"{load_args})\n'
                f'pipe.load_lora_weights("{out_dir}", weight_name="pytorch_lora_weights.safetensors")\n'
                f'pipe.scheduler = {sched}.from_pretrained("{out_dir}", subfolder="scheduler")')
    else:
        load = (f'pipe = DiffusionPipeline.from_pretrained("{out_dir}"{load_args})\n'
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
image = pipe("a prompt", num_inference_steps={steps}{guidance_arg}{ts_arg}).images[0]
```

or `fewstep sample --model {out_dir} --prompt "a prompt" --num_inference_steps {steps}`.
The full training configuration is in `fewstep_config.yaml`.
"""
    if metrics:
        card += "\n## Evaluation\n\n" + json.dumps(metrics, indent=2) + "\n"
    (Path(out_dir) / "README.md").write_text(card)
