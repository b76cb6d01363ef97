"""Classifier-free guidance and the guidance-scale embedding, written once for every method and sampler.

CFG (Ho & Salimans 2022): D = D(∅) + s (D(c) − D(∅)), applied to raw network outputs by the samplers
(as diffusers' pipelines do) and to (x̂₀, ε̂) by the methods (LCD's teacher step, DMD2's real score);
both are the same linear map, so the one function serves both.
"""

from __future__ import annotations

import math

import torch

from .schedule import Prediction


def cat_cond(*conds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stack several conditions (dicts of tensors) along the batch, e.g. uncond ‖ cond for one CFG forward."""
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}


def cfg(cond: torch.Tensor, uncond: torch.Tensor, scale=None, *, w=None) -> torch.Tensor:
    """Classifier-free guidance, given the scale s as diffusers writes it, D(∅) + s (D(c) − D(∅)), or
    the guidance weight w = s − 1 as the LCM papers write it, D(c) + w (D(c) − D(∅)); a number or a
    per-sample tensor broadcast against the outputs. The two forms are equal up to float rounding; each
    caller uses the one its algorithm is written in, so results match the references bit for bit."""
    if w is not None:
        return cond + w * (cond - uncond)
    return uncond + scale * (cond - uncond)


def cfg_prediction(cond: Prediction, uncond: Prediction, scale=None, *, w=None) -> Prediction:
    """CFG of x̂₀ and ε̂ alike, so that a solver step from the guided pair stays on the guided ODE."""
    return Prediction(cfg(cond.x0, uncond.x0, scale, w=w), cfg(cond.eps, uncond.eps, scale, w=w),
                      cfg(cond.raw, uncond.raw, scale, w=w))


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype=torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of 1000·w (VDM-style) fed to the student's ``time_embedding.cond_proj``.

    Same function as diffusers' LCM pipelines use at inference, so a student trained on w sees
    ``guidance_scale − 1`` there.
    """
    w = w.reshape(-1).float() * 1000.0
    half = embedding_dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    args = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)
