"""Speed levers that change how a step runs, never what it computes (docs/PERFORMANCE.md).

The trainer applies them to every network the method holds, trainable or frozen, before accelerate
wraps the trainable ones; methods need not know about them.
"""

from __future__ import annotations

import logging

import torch

from ..config import ConfigError

log = logging.getLogger("fewstep")


def held_networks(*owners) -> list[torch.nn.Module]:
    """Every top-level nn.Module an owner (the method, the bundle and its parts) holds, once each."""
    seen: dict[int, torch.nn.Module] = {}
    for owner in owners:
        values = list(getattr(owner, "__dict__", {}).values())  # (a method may run without a bundle)
        values += list(getattr(owner, "parts", {}).values())
        for value in values:
            if isinstance(value, torch.nn.Module):
                seen.setdefault(id(value), value)
    return list(seen.values())


def denoisers(nets: list[torch.nn.Module], cls: type) -> list[torch.nn.Module]:
    """The denoiser networks (instances of the teacher's class) inside ``nets``, once each: the student,
    the teacher, EMA targets, fake-score networks wrapped with a head."""
    found: dict[int, torch.nn.Module] = {}
    for net in nets:
        for m in net.modules():
            if isinstance(m, cls):
                found.setdefault(id(m), m)
    return list(found.values())


def check_compile(cfg, device_type: str) -> None:
    """Refuse --torch_compile where its default backend is known to be wrong (also run by --dry_run)."""
    if cfg.torch_compile and device_type != "cuda" and cfg.torch_compile_backend == "inductor":
        # Found here (torch 2.13, CPU inductor): the compiled diffusers UNet returns the right
        # output but wrong gradients (all zero for mid_block.resnets.1.conv2.weight, 30-90 % off
        # elsewhere), while the aot_eager backend is exact. A wrong gradient is worse than a slow one.
        raise ConfigError("--torch_compile with the inductor backend is for CUDA devices: on the CPU it computes "
                          "wrong UNet gradients (torch 2.13, found by tests/test_speed.py). Drop --torch_compile, "
                          "or check tracing only with --torch_compile_backend aot_eager")


def speed_setup(cfg, method, bundle, device: torch.device) -> None:
    nets = held_networks(method, bundle)
    if cfg.channels_last:
        # 4-D weights in NHWC: cuDNN's fastest convolution kernels on tensor cores read this layout,
        # and a convolution whose weight is channels-last returns a channels-last output, so the
        # whole UNet stays NHWC without converting activations. Parameters keep their values.
        for net in nets:
            net.to(memory_format=torch.channels_last)
    if cfg.torch_compile:
        if bundle is None or getattr(bundle, "denoiser", None) is None:
            raise ConfigError("--torch_compile compiles the teacher's denoiser class; this method has no teacher")
        check_compile(cfg, device.type)
        # aot_eager traces the same graphs (dynamo, then autograd ahead of time) and runs them with
        # eager kernels: no speed, but graph breaks and recompilations show exactly as under inductor,
        # on any device, which is how the tests check the compiled step.
        nets_to_compile = denoisers(nets, type(bundle.denoiser))
        kw = {"mode": cfg.torch_compile_mode} if cfg.torch_compile_backend == "inductor" else {}
        for net in nets_to_compile:
            net.compile(backend=cfg.torch_compile_backend, **kw)
        log.info("torch.compile (%s, %s) of %d denoiser network(s)", cfg.torch_compile_backend,
                 cfg.torch_compile_mode, len(nets_to_compile))
