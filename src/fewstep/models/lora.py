"""LoRA on diffusers denoisers (UNets and transformers alike) through peft: attach, run with adapters
off, EMA adapter, save in the formats the ecosystem loads, load back, fuse.

The diffusers file holds PEFT key names with their LoraConfig as metadata (what ``save_lora_weights``
writes for peft models), under the denoiser's name (``unet.…`` / ``transformer.…``) as the family's
pipeline expects; where the family has other layouts (a kohya / ComfyUI file, :meth:`ModelBundle.
kohya_lora`; DiffSynth-Studio's; :meth:`ModelBundle.lora_layouts`) those files are written too. Target
modules default to the family's (:attr:`ModelBundle.lora_targets`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
META_FILE = "fewstep_lora.json"


def attach_lora(net, rank: int, alpha: float, dropout: float, targets: list[str], adapter: str = "default",
                flag: str = "--lora_target_modules"):
    """Add a LoRA adapter (B = 0, so the model is unchanged until trained) to a diffusers denoiser; its
    weights are fp32 even when the base weights are half precision."""
    from peft import LoraConfig

    check_targets(net, targets, flag)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     init_lora_weights="gaussian")
    net.add_adapter(cfg, adapter_name=adapter)
    for name, p in net.named_parameters():
        if f".{adapter}." in name:
            p.data = p.data.float()
    return cfg


def check_targets(model, targets: list[str], flag: str = "--lora_target_modules") -> None:
    """A ConfigError naming the model's layer names when no module matches ``targets`` (peft's rule: a
    module matches a target equal to its full name or to a dotted suffix of it)."""
    from ..config import ConfigError

    names = [n for n, _ in model.named_modules()]
    if any(n == t or n.endswith("." + t) for n in names for t in targets):
        return
    leaves = set()
    for n, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            parts = n.split(".")
            # "to_out.0", "ff.net.2": an index alone names nothing
            leaves.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    raise ConfigError(f"{flag} {','.join(targets)}: no module of the {type(model).__name__} has such a "
                      f"name; its Linear/Conv layers are named {', '.join(sorted(leaves))}")


def adapter_params(net, adapter: str = "default") -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in net.named_parameters() if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n]


@contextlib.contextmanager
def adapters_disabled(net):
    """The base model (the teacher in LCM-LoRA): one UNet in memory instead of two."""
    net.disable_adapters()
    try:
        yield net
    finally:
        net.enable_adapters()


@contextlib.contextmanager
def active_adapter(net, name: str):
    """Run with another adapter (the EMA target) active; training flags restored afterwards."""
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    net.set_adapter(name)
    try:
        yield net
    finally:
        net.set_adapter("default")
        for n, p in net.named_parameters():
            p.requires_grad_(flags[n])


def add_ema_adapter(net, cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A second adapter "ema" initialised to the trained one; returns (ema, online) parameter pairs."""
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    net.add_adapter(cfg, adapter_name="ema")
    net.set_adapter("default")
    online = dict(adapter_params(net, "default"))
    pairs = []
    for n, p in adapter_params(net, "ema"):
        src = online[n.replace(".ema.", ".default.")]
        p.data = src.detach().clone().float()
        p.requires_grad_(False)
        pairs.append((p, src))
    for n, p in net.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    return pairs


def lora_state_dict(net, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-format keys (``down_blocks.0...to_q.lora_A.weight``) of one adapter."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(net, adapter_name=adapter).items()}


def save_lora(net, out_dir: Path, bundle, base_model: str, adapter: str = "default") -> None:
    """``pytorch_lora_weights.safetensors`` (diffusers keys, loadable by ``pipe.load_lora_weights``),
    the family's other layouts (kohya, DiffSynth), and the metadata fewstep needs to reload."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_sd = lora_state_dict(net, adapter)
    cfg = net.peft_config[adapter]
    meta = cfg.to_dict()
    if isinstance(meta.get("target_modules"), (set, frozenset)):
        # (a set's order follows the process's string hashing: the same adapter would be written with
        # different bytes by each process, e.g. a run's export and `fewstep export --from_checkpoint`)
        meta["target_modules"] = sorted(meta["target_modules"])
    # PEFT key names under the denoiser's prefix: the format diffusers' own loaders write and read today
    # (its older "lora.down/up" naming loses the attention layers when loaded back).
    bundle.pipeline_cls.save_lora_weights(out_dir, safe_serialization=True,
                                          **bundle.lora_save_kwargs(peft_sd, meta))
    for name, layout in bundle.lora_layouts(peft_sd, cfg.lora_alpha).items():  # kohya, DiffSynth, ...
        save_file(layout, str(out_dir / name))
    (out_dir / META_FILE).write_text(json.dumps(
        {"base_model": str(base_model), "rank": cfg.r, "lora_alpha": cfg.lora_alpha,
         "target_modules": sorted(cfg.target_modules)}, indent=2) + "\n")


def is_lora_folder(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / LORA_FILE).is_file()


def fuse_into(bundle, lora_dir: str | Path) -> None:
    """Load a fewstep LoRA folder into the bundle's denoiser and merge it (W ← W + (α / r) B A)."""
    pipe = bundle.pipeline(bundle.denoiser, folder_scheduler(lora_dir, bundle))
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE, adapter_name="fewstep")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    bundle.denoiser = getattr(pipe, bundle.denoiser_name)


def folder_scheduler(lora_dir, bundle):
    """The scheduler the LoRA student was trained for, as its folder saved it: class and config of
    ``scheduler/`` (an LCM scheduler for LCM-LoRA, DDIM with trailing spacing or flow Euler for direct
    distillation). Folders without one are LCM-LoRA folders: the LCM scheduler of the base schedule."""
    import diffusers

    from ..diffusion.sampling import make_scheduler

    sched_dir = Path(lora_dir) / "scheduler"
    if (sched_dir / "scheduler_config.json").is_file():
        name = json.loads((sched_dir / "scheduler_config.json").read_text()).get("_class_name", "LCMScheduler")
        return getattr(diffusers, name).from_pretrained(str(sched_dir))
    return make_scheduler("lcm", bundle.scheduler_config)
