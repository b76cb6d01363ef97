"""Memory per GPU of each method on each teacher family, under DDP and under --fsdp on N GPUs, computed
from parameter counts (no weights are loaded; the counts are the published model sizes, rounded, listed
below), and the setting an 80 GB card needs. Prints the README's table (markdown).

The formula (bytes per GPU, activations excluded):
  trained network   16 B/param  fp32 master weights 4 + fp32 gradients 4 + AdamW moments 8
  EMA / target copy  4 B/param  fp32 (lcm's θ⁻; DisBack's degradation target)
  frozen denoiser    2 B/param  bf16 (the teacher / real score; --cast_teacher_unet with bf16)
  LoRA base          2 B/param  bf16; the adapters (rank 64, ~2 % of the base: trained at 16 B/param,
                                plus an fp32 EMA adapter at 4 B/param) are counted as 0.02 x params
  text encoders, VAE 2 B/param  bf16, whole on every rank (0 with --cache_dir)
Under --fsdp on N GPUs every trained network, EMA/target copy and frozen denoiser >= 1 GiB is divided by N
(--fsdp_frozen auto); text encoders and the VAE are not. "fits" leaves 25 GB of an 80 GB card for
activations (an SDXL UNet at 1024 px, batch 4 with --gradient_checkpointing needs ~10-20 GB; large DiTs
more): DDP <= 55 GB, else FSDP <= 55 GB, else --fsdp with --fsdp_offload (CPU memory holds the shards)
or LoRA.

Usage: python benchmarks/memory_table.py [--gpus 8]
"""

from __future__ import annotations

import argparse

GB = 1e9
# Parameters (billions), published sizes rounded: denoiser, then the frozen parts a run without
# --cache_dir holds (text encoders + VAE).
FAMILIES = {
    "SD1.5": (0.86, 0.123 + 0.084),  # UNet; CLIP ViT-L text encoder, VAE
    "SDXL": (2.57, 0.123 + 0.695 + 0.084),  # UNet; CLIP ViT-L + OpenCLIP bigG, VAE
    "SD3.5-medium": (2.5, 0.123 + 0.695 + 4.76 + 0.084),  # MMDiT; CLIP-L, CLIP-G, T5-XXL encoder, VAE
    "FLUX.1": (11.9, 0.123 + 4.76 + 0.084),  # transformer; CLIP-L, T5-XXL encoder, VAE
    "Qwen-Image": (20.4, 8.3 + 0.127),  # MMDiT; Qwen2.5-VL 7B, VAE
}
LORA_FRACTION = 0.02
ROOM = 25  # GB of an 80 GB card kept for activations
FROZEN_SHARD = 2 ** 30  # --fsdp_frozen auto


def networks(method: str, p: float) -> list[tuple[str, float, float]]:
    """(kind, billions of parameters, bytes per parameter) of the networks a method holds."""
    n = p * 1e9
    if method == "lcm (LCD)":
        return [("trained", n, 16), ("state", n, 4), ("frozen", n, 2)]
    if method == "lcm LoRA":
        # the base weights live in the trained network (sharded with it, whatever their size)
        return [("base", n, 2), ("trained", LORA_FRACTION * n, 16), ("state", LORA_FRACTION * n, 4)]
    if method == "direct":
        return [("trained", n, 16)]
    if method == "dmd2":  # generator and fake score trained, real score frozen
        return [("trained", n, 16), ("trained", n, 16), ("frozen", n, 2)]
    if method == "disback":  # dmd2 plus the degradation path's target
        return [("trained", n, 16), ("trained", n, 16), ("frozen", n, 2), ("frozen", n, 2)]
    raise KeyError(method)


METHODS = ["lcm (LCD)", "lcm LoRA", "direct", "dmd2", "disback"]


def per_gpu(method: str, family: str, gpus: int) -> tuple[float, float]:
    """(DDP GB, FSDP GB) per GPU."""
    p, rest = FAMILIES[family]
    ddp = fsdp = rest * 1e9 * 2
    for kind, n, b in networks(method, p):
        ddp += n * b
        shard = kind in ("trained", "state", "base") or n * 2 >= FROZEN_SHARD
        fsdp += n * b / gpus if shard else n * b
    return ddp / GB, fsdp / GB


def advice(ddp: float, fsdp: float) -> str:
    if ddp <= 80 - ROOM:
        return "DDP"
    if fsdp <= 80 - ROOM:
        return "--fsdp"
    return "--fsdp --fsdp_offload, or LoRA"


def table(gpus: int) -> str:
    rows = [f"| teacher | method | DDP GB/GPU | --fsdp on {gpus} GPUs GB/GPU | 80 GB cards need |",
            "|---|---|---:|---:|---|"]
    for fam in FAMILIES:
        for m in METHODS:
            d, f = per_gpu(m, fam, gpus)
            rows.append(f"| {fam} | {m} | {d:.1f} | {f:.1f} | {advice(d, f)} |")
    return "\n".join(rows)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    print(table(ap.parse_args().gpus))
