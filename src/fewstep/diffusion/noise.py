"""Initial noise that can be regenerated exactly from (seed, rand_device).

Teacher data written by ``fewstep generate`` records, per image, the seed and the device whose random
generator drew the initial latent noise (the DiffSynth-Studio metadata convention). Training methods
that need the same noise again (direct distillation, DMD2's regression loss) call
:func:`initial_noise` with the recorded pair and get the identical tensor, bit for bit, on any
machine: the noise is drawn on ``rand_device`` (normally "cpu") and only then moved.
"""

from __future__ import annotations

import torch


def initial_noise(seed: int, rand_device: str, shape: tuple[int, ...], device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.randn(shape)`` from a generator on ``rand_device`` seeded with ``seed`` (as diffusers'
    pipelines draw latents from a ``torch.Generator(rand_device).manual_seed(seed)``)."""
    gen = torch.Generator(rand_device).manual_seed(int(seed))
    noise = torch.randn(shape, generator=gen, device=rand_device, dtype=torch.float32)
    return noise.to(device or rand_device, dtype)


def batch_noise(seeds, rand_devices, shape: tuple[int, ...], device=None,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One :func:`initial_noise` per sample, stacked: ``shape`` is the per-sample shape (C, H, W)."""
    return torch.stack([initial_noise(s, d, shape, device, dtype) for s, d in zip(seeds, rand_devices)])
