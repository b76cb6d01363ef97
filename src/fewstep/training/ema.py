"""EMA / target-network updates, fused over all tensors with torch's foreach kernels."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """θ⁻ ← μ θ⁻ + (1 − μ) θ for every parameter (one fused lerp instead of a Python loop)."""
    tgt = [p for p in target.parameters()]
    src = [p.detach().to(q.dtype) for p, q in zip(online.parameters(), tgt)]
    if len(tgt) != len(src):
        raise RuntimeError("EMA target and online network have different parameter lists")
    torch._foreach_lerp_(tgt, src, 1.0 - decay)
