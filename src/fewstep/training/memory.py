"""What a run will hold in memory, for ``--dry_run``: every network the method builds, its parameter
count, and its bytes at the run's dtypes, with the gradients and optimizer states of what it trains.

Nothing is estimated by formula: the teacher's parts are built from their configs on PyTorch's meta
device (shapes and dtypes, no storage; :meth:`~fewstep.models.base.ModelBundle.to_meta`), and the method
itself is constructed on them exactly as the trainer constructs it, so its own code decides what it
copies (students, EMA targets, fake scores), what it casts (frozen parts to the mixed-precision dtype)
and what it trains (full networks or LoRA adapters). Activations are not included: they depend on the
resolution and batch, and ``--gradient_checkpointing`` bounds them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..config import ConfigError


@dataclass
class Held:
    """One network the run holds: parameters (those first seen in it) and their bytes at their dtypes."""

    name: str
    params: int  # all of its parameters
    new_params: int  # those not already counted under an earlier network (LoRA shares the teacher's)
    bytes: int  # bytes of its new parameters and buffers
    dtypes: list[str]
    trainable: int = 0
    shared_with: list[str] = field(default_factory=list)


@dataclass
class Plan:
    networks: list[Held]
    trainable: int
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.grad_bytes + self.optimizer_bytes


class _MetaAccelerator:
    """What a method's constructor asks of accelerate, for a construction on the meta device."""

    device = torch.device("meta")
    num_processes = 1
    is_main_process = True
    process_index = 0

    @staticmethod
    def unwrap_model(model):
        return model

    def wait_for_everyone(self):
        pass

    def autocast(self):
        return contextlib.nullcontext()


@contextlib.contextmanager
def _meta_buffers():
    """Buffers of new modules on the meta device too (accelerate's ``include_buffers=True`` would also put
    every plain tensor a constructor makes there, where a method reads values back)."""
    register = torch.nn.Module.register_buffer

    def on_meta(module, name, tensor, persistent=True):
        register(module, name, tensor, persistent)
        if tensor is not None:
            module._buffers[name] = module._buffers[name].to("meta")

    torch.nn.Module.register_buffer = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_buffer = register


def plan(spec, text_encoders: bool | None = None) -> Plan | None:
    """The networks ``spec``'s method holds, built on the meta device; None for methods without a teacher
    (their networks come from a preset at run time). ``text_encoders``: whether the run holds them
    (default: unless it trains from a cache)."""
    from accelerate import init_empty_weights

    from ..models.bundle import load_bundle

    cfg, mcfg, cls = spec.train, spec.method, spec.method_cls
    if not cls.needs_teacher:
        return None
    bundle = load_bundle(cfg.pretrained_teacher_model, revision=cfg.teacher_revision,
                         vae_path=cfg.pretrained_vae_model_name_or_path, weights=False)
    bundle.to_meta(text_encoders=not cfg.cache_dir if text_encoders is None else text_encoders)
    with init_empty_weights(), _meta_buffers():  # every module the method creates is on the meta device
        method = cls(cfg, mcfg, bundle, _MetaAccelerator())
        groups = method.groups()
    trainable = {id(p): p for g in groups.values()
                 for p in (g.params or [q for q in g.module.parameters() if q.requires_grad])}
    nets: dict[int, tuple[str, torch.nn.Module]] = {}
    for name, value in list(vars(method).items()) + list(bundle.parts.items()):
        if isinstance(value, torch.nn.Module) and id(value) not in nets:
            nets[id(value)] = (name, value)
    seen: dict[int, str] = {}
    held = []
    for name, net in nets.values():
        tensors = list(net.named_parameters()) + list(net.named_buffers())
        new = [t for _, t in tensors if id(t) not in seen]
        params = [p for p in net.parameters()]
        shared = sorted({seen[id(t)] for _, t in tensors if id(t) in seen})
        held.append(Held(name, sum(p.numel() for p in params),
                         sum(p.numel() for p in params if id(p) not in seen),
                         sum(t.numel() * t.element_size() for t in new),
                         sorted({str(t.dtype).replace("torch.", "") for t in new}),
                         sum(p.numel() for p in params if id(p) in trainable and id(p) not in seen), shared))
        for _, t in tensors:
            seen.setdefault(id(t), name)
    n_train = sum(p.numel() for p in trainable.values())
    grads = sum(p.numel() * p.element_size() for p in trainable.values())
    # AdamW keeps two moments per trained parameter in its dtype; bitsandbytes' 8-bit AdamW one byte each.
    states = 2 * n_train if cfg.use_8bit_adam else 2 * grads
    return Plan(held, n_train, sum(h.bytes for h in held), grads, states)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def report(spec) -> str:
    """The --dry_run lines of :func:`plan`."""
    try:
        p = plan(spec)
    except ConfigError:
        raise
    except Exception as e:  # an estimate must not stop the other checks; say why it is missing
        return f"memory: not estimated ({type(e).__name__}: {e})"
    if p is None:
        return "memory: the networks are built from the preset at run time (not estimated)"
    lines = ["memory the run holds (parameters on the meta device at this run's dtypes; activations not included):"]
    for h in p.networks:
        share = f", shares {_count(h.params - h.new_params)} with {', '.join(h.shared_with)}" if h.shared_with else ""
        train = f", trains {_count(h.trainable)}" if h.trainable else ""
        lines.append(f"  {h.name:16s} {_count(h.params):>11s} parameters  {_size(h.bytes):>10s} "
                     f"({'/'.join(h.dtypes) or '-'}){train}{share}")
    opt = "8-bit AdamW" if spec.train.use_8bit_adam else "AdamW"
    lines.append(f"  weights {_size(p.weight_bytes)} + gradients {_size(p.grad_bytes)} + {opt} states "
                 f"{_size(p.optimizer_bytes)} = {_size(p.total_bytes)} per process under DDP "
                 f"({_count(p.trainable)} trained parameters)")
    return "\n".join(lines)
