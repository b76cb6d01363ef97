"""EMA / target-network updates, fused over all tensors with torch's foreach kernels. Parameters that
DeepSpeed ZeRO-3 partitions (the trained network of such a run, and the EMA adapter inside it) are gathered
around the update (training/zero.py): their tensors are placeholders otherwise."""

from __future__ import annotations

import torch

from .zero import full_parameters


@torch.no_grad()
def ema_update(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """θ⁻ ← μ θ⁻ + (1 − μ) θ for every parameter (one fused lerp instead of a Python loop)."""
    tgt = [p for p in target.parameters()]
    online_params = list(online.parameters())
    if len(tgt) != len(online_params):
        raise RuntimeError("EMA target and online network have different parameter lists")
    with full_parameters(online_params), full_parameters(tgt, modify=True):
        src = [p.detach().to(q.dtype) for p, q in zip(online_params, tgt)]
        torch._foreach_lerp_(tgt, src, 1.0 - decay)


@torch.no_grad()
def ema_lerp(ema: list[torch.Tensor], online: list[torch.Tensor], decay: float) -> None:
    """ema ← μ ema + (1 − μ) online, pairwise (an EMA adapter next to its online adapter)."""
    with full_parameters(online), full_parameters(ema, modify=True):
        torch._foreach_lerp_(ema, [p.detach() for p in online], 1.0 - decay)
