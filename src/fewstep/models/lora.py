"""LoRA on diffusers denoisers through peft: attach, run with adapters off, EMA adapter, save in the
formats the ecosystem loads (diffusers/PEFT keys and kohya keys), load back, fuse.

The diffusers file holds PEFT key names with their LoraConfig as metadata (what ``save_lora_weights``
writes for peft models); the kohya file goes through diffusers' ``convert_state_dict_to_kohya``, with
one fix on top: its ``alpha``, which the converter sets to the rank (right only when α == r).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

# diffusers' LCM-LoRA scripts: attention projections, feed-forward, transformer in/out projections,
# resnet convolutions and time-embedding projections, down/up-samplers (ALGORITHMS.md §2).
DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                   "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]
LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"
META_FILE = "fewstep_lora.json"


def attach_lora(unet, rank: int, alpha: float, dropout: float, targets: list[str], adapter: str = "default",
                flag: str = "--lora_target_modules"):
    """Add a LoRA adapter (B = 0, so the model is unchanged until trained); its weights are fp32 even
    when the base weights are half precision."""
    from peft import LoraConfig

    check_targets(unet, targets, flag)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                     init_lora_weights="gaussian")
    unet.add_adapter(cfg, adapter_name=adapter)
    for name, p in unet.named_parameters():
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


def adapter_params(unet, adapter: str = "default") -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in unet.named_parameters() if f".lora_A.{adapter}." in n or f".lora_B.{adapter}." in n]


@contextlib.contextmanager
def adapters_disabled(unet):
    """The base model (the teacher in LCM-LoRA): one UNet in memory instead of two."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


@contextlib.contextmanager
def active_adapter(unet, name: str):
    """Run with another adapter (the EMA target) active; training flags restored afterwards."""
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.set_adapter(name)
    try:
        yield unet
    finally:
        unet.set_adapter("default")
        for n, p in unet.named_parameters():
            p.requires_grad_(flags[n])


def add_ema_adapter(unet, cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A second adapter "ema" initialised to the trained one; returns (ema, online) parameter pairs."""
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    unet.add_adapter(cfg, adapter_name="ema")
    unet.set_adapter("default")
    online = dict(adapter_params(unet, "default"))
    pairs = []
    for n, p in adapter_params(unet, "ema"):
        src = online[n.replace(".ema.", ".default.")]
        p.data = src.detach().clone().float()
        p.requires_grad_(False)
        pairs.append((p, src))
    for n, p in unet.named_parameters():
        if n in flags:
            p.requires_grad_(flags[n])
    return pairs


def lora_state_dict(unet, adapter: str = "default") -> dict[str, torch.Tensor]:
    """PEFT-format keys (``down_blocks.0...to_q.lora_A.weight``) of one adapter."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float().cpu().contiguous()
            for k, v in get_peft_model_state_dict(unet, adapter_name=adapter).items()}


def save_lora(unet, out_dir: Path, pipeline_cls, base_model: str, adapter: str = "default") -> None:
    """``pytorch_lora_weights.safetensors`` (diffusers keys, loadable by ``pipe.load_lora_weights``),
    the kohya file (``lora_unet_…`` keys with ``.alpha``), and the metadata fewstep needs to reload."""
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    peft_sd = lora_state_dict(unet, adapter)
    cfg = unet.peft_config[adapter]
    # PEFT key names under the "unet." prefix: the format diffusers' own loaders write and read today
    # (its older "lora.down/up" naming loses the attention layers when loaded back).
    pipeline_cls.save_lora_weights(out_dir, unet_lora_layers=peft_sd, safe_serialization=True,
                                   unet_lora_adapter_metadata=cfg.to_dict())
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    for k in kohya:
        if k.endswith(".alpha"):  # the converter writes alpha = rank; the scale is alpha / rank
            kohya[k] = torch.tensor(float(cfg.lora_alpha))
    save_file(kohya, str(out_dir / KOHYA_FILE))
    (out_dir / META_FILE).write_text(json.dumps(
        {"base_model": str(base_model), "rank": cfg.r, "lora_alpha": cfg.lora_alpha,
         "target_modules": sorted(cfg.target_modules)}, indent=2) + "\n")


def is_lora_folder(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file() and (Path(path) / LORA_FILE).is_file()


def fuse_into(bundle, lora_dir: str | Path) -> None:
    """Load a fewstep LoRA folder into the bundle's UNet and merge it (W ← W + (α / r) B A)."""
    pipe = bundle.pipeline(bundle.unet, folder_scheduler(lora_dir, bundle))
    pipe.load_lora_weights(str(lora_dir), weight_name=LORA_FILE, adapter_name="fewstep")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()  # keeps the fused weights, drops the adapter layers
    bundle.unet = pipe.unet


def folder_scheduler(lora_dir, bundle):
    """The scheduler the LoRA student was trained for, as its folder saved it: class and config of
    ``scheduler/`` (LCMScheduler for LCM-LoRA, DDIMScheduler with trailing spacing for direct
    distillation). Folders without one are LCM-LoRA folders: an LCMScheduler on the base schedule."""
    import diffusers

    sched_dir = Path(lora_dir) / "scheduler"
    if (sched_dir / "scheduler_config.json").is_file():
        name = json.loads((sched_dir / "scheduler_config.json").read_text()).get("_class_name", "LCMScheduler")
        return getattr(diffusers, name).from_pretrained(str(sched_dir))
    return diffusers.LCMScheduler.from_config(bundle.scheduler_config)
