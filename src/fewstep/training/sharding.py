"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``): which networks are sharded and
how, what each rank holds, sharded checkpoints, and full-weight exports. The trainer calls this module;
methods only use :func:`full_tensors` / :func:`copy_into` where they read or write weights by hand.

Why fewstep shards the networks itself rather than through accelerate's FSDP plugin: accelerate's FSDP2
path wraps one model per ``prepare`` call and leaves every network it is not given (a frozen teacher, an
EMA target) whole on each rank, while DMD2 trains two networks next to a frozen teacher and LCD a student
next to its EMA target and teacher. Here every network a method holds is sharded on one device mesh, on
GPUs and, over gloo, on CPU processes (where accelerate refuses FSDP), so the code the tests run is the
code GPU runs run. ``accelerate launch`` with an FSDP config (``fsdp_version: 2``) turns ``--fsdp`` on and
its ``fsdp_config`` keys become the ``--fsdp_*`` settings (config.py: :func:`apply_launcher_settings`); accelerate
still launches the processes and provides the process group, data sharding, autocast and trackers.

Units. Each network is sharded block by block (one all-gather per block in forward and backward), then as
a whole for its remaining parameters. Blocks are the elements of its ``nn.ModuleList``s that hold at least
1 % of its parameters (down/up blocks, transformer blocks: whatever the family), or the classes named by
``--fsdp_wrap`` (accelerate's ``fsdp_transformer_layer_cls_to_wrap``). A wrapper with no parameters of its
own around models (DMD2's fake score: a denoiser and a GAN head) has each model sharded separately, so a
call of the inner denoiser alone (the real score of a LoRA fake score) is a root forward of its own.

Which networks. Every trainable group's module, with its optimizer state (AdamW creates its moments on
the shards); the method's stateful networks (EMA targets), always sharded, exactly like their online
network, so that θ⁻ ← μθ⁻ + (1 − μ)θ runs on local shards without communication; and the frozen networks
the method names (:meth:`Method.frozen_networks`: the teacher / real score, DisBack's target) as
``--fsdp_frozen`` says: ``auto`` shards those of 1 GiB or more and keeps smaller ones whole on every rank
(no all-gather per forward). The VAE and text encoders stay whole on every rank (``--cache_dir`` drops
them). LoRA adapters live inside the blocks of their base network and are sharded with it.

Mixed precision is FSDP's MixedPrecisionPolicy: weights gathered in the --mixed_precision dtype,
gradients reduced in fp32; the fp32 shards are the master weights the optimizer steps.

Checkpoints: the sharded state (networks and optimizers) goes through ``torch.distributed.checkpoint``
into ``sharded/`` of the checkpoint folder, each rank writing its own file; DCP re-shards on load, so a
checkpoint resumes on another number of processes. Exports gather the full weights into the CPU memory
of the main process (:meth:`Sharding.full_weights`).

Construction. On GPUs a method builds its networks in CPU memory (:func:`build_device`), and
``fully_shard`` moves them to the GPU one block's shard at a time, so no process ever holds a whole
network on its GPU; the unsharded rest is moved afterwards (:meth:`Sharding.relocate`). Each process still
builds the networks whole in CPU memory first (host RAM ≈ processes × the networks' size).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from .checkpoint import SHARDED_DIR

log = logging.getLogger("fewstep")

FROZEN_SHARD_BYTES = 1 << 30  # --fsdp_frozen auto: frozen networks from this size on are sharded
UNIT_FRACTION = 100  # a ModuleList element is a unit when it holds >= 1/100 of its network's parameters


# ---- settings ------------------------------------------------------------------------------------

def rng_mode(cfg) -> str:
    """The random streams in force: ``rank`` or ``batch`` (``auto``: batch under --fsdp)."""
    if cfg.rng_streams == "auto":
        return "batch" if cfg.fsdp else "rank"
    return cfg.rng_streams


def build_device(acc) -> torch.device:
    """Where a method builds its networks under --fsdp: CPU memory on GPUs (see the module doc)."""
    return torch.device("cpu")


class BuildProxy:
    """The accelerator as a method sees it while it builds its networks: ``device`` is the build device,
    everything else is the accelerator's. The trainer gives the method the accelerator itself afterwards."""

    def __init__(self, acc, device: torch.device):
        self._acc, self.device = acc, device

    def __getattr__(self, name):
        return getattr(self._acc, name)


# ---- tensors -------------------------------------------------------------------------------------

def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def plain(t):
    """A value computed on shards (a gradient norm, replicated over the ranks) as an ordinary tensor."""
    return t.full_tensor() if is_sharded(t) else t


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full copies of ``tensors`` (sharded ones gathered: a collective every rank must run, in the same
    order), detached. Unsharded tensors are returned as they are."""
    return {k: (v.full_tensor() if is_sharded(v) else v).detach() for k, v in tensors.items()}


@torch.no_grad()
def copy_into(params: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """``params[k] ← full[k]`` for every key, a sharded tensor taking its own slice of the full value (each
    rank reads the same full tensors: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    for k, p in params.items():
        src = full[k].to(p.dtype)
        if is_sharded(p):
            local = distribute_tensor(src.to(p.to_local().device), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(local.to_local())
        else:
            p.copy_(src.to(p.device))


def module_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def local_bytes(tensors) -> int:
    """Bytes of the tensors as this rank holds them (its shard of a sharded tensor)."""
    total = 0
    for t in tensors:
        t = t.to_local() if is_sharded(t) else t
        total += t.numel() * t.element_size()
    return total


# ---- units ---------------------------------------------------------------------------------------

def roots_of(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded as networks of their own: ``net``, or, for a wrapper without parameters of its
    own around models (modules with a ``config``), each of its children (recursively)."""
    own = any(True for _ in net.parameters(recurse=False))
    kids = [c for c in net.children() if any(True for _ in c.parameters())]
    if own or hasattr(net, "config") or not any(hasattr(c, "config") for c in kids):
        return [net]
    return [r for c in kids for r in roots_of(c)]


def units_of(net: torch.nn.Module, wrap: list[str] | None = None) -> list[torch.nn.Module]:
    """The blocks sharded as units inside ``net``, outer ones first: instances of the ``wrap`` classes, or
    the ModuleList elements holding at least 1/UNIT_FRACTION of its parameters."""
    if wrap:
        names = set(wrap)
        return [m for m in net.modules() if m is not net and type(m).__name__ in names]
    total = sum(p.numel() for p in net.parameters())
    floor = max(1, total // UNIT_FRACTION)
    found = []
    for m in net.modules():
        if isinstance(m, torch.nn.ModuleList):
            found += [c for c in m if _layers(c) >= 2 and sum(p.numel() for p in c.parameters()) >= floor]
    return found


def _layers(module: torch.nn.Module) -> int:
    """Parameterised layers inside ``module``, a LoRA-wrapped layer counting as one: a block has several;
    a single layer (a Linear, a projection wrapper) is no unit of its own, its output is often a view,
    which an in-place op of the caller would detach from FSDP's backward hook."""
    if hasattr(module, "base_layer") or any(True for _ in module.parameters(recurse=False)):
        return 1
    return sum(_layers(c) for c in module.children())


# ---- the plan: which network is held how ----------------------------------------------------------

@dataclass
class Held:
    """One network of the run: its role (``trained``, ``state``: an EMA/target copy, ``frozen``),
    whether it is sharded, and why."""

    name: str
    module: torch.nn.Module
    role: str
    shard: bool
    why: str
    trainable: list  # the parameters its optimizer steps (trained networks)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    @property
    def bytes(self) -> int:
        return module_bytes(self.module)

    def dtypes(self) -> str:
        names = sorted({str(p.dtype).removeprefix("torch.") for p in self.module.parameters()})
        return "+".join(n.replace("float", "fp").replace("bfloat16", "bf16") for n in names)

    def per_rank(self, n: int) -> dict[str, int]:
        """Bytes one of ``n`` ranks holds for this network: weights, gradients, AdamW's two moments (fp32),
        a sharded network's share being ⌈x / n⌉ (activations are not counted)."""
        div = n if self.shard else 1
        trained = sum(p.numel() for p in self.trainable)
        w = -(-self.bytes // div)
        g = -(-sum(p.numel() * p.element_size() for p in self.trainable) // div)
        adam = -(-trained * 8 // div)
        return {"weights": w, "grads": g, "adam": adam, "total": w + g + adam}


def plan(method, cfg, groups: dict) -> list[Held]:
    """The networks of the run and how each is held under --fsdp (see the module doc)."""
    held: list[Held] = []
    inside: set[int] = set()
    for name, g in groups.items():
        params = g.params or [p for p in g.module.parameters() if p.requires_grad]
        held.append(Held(name, g.module, "trained", True, "trained", params))
        inside |= {id(m) for m in g.module.modules()}
    for name, obj in method.stateful().items():
        if isinstance(obj, torch.nn.Module) and id(obj) not in inside and any(True for _ in obj.parameters()):
            held.append(Held(name, obj, "state", True, "EMA/target copy: sharded like its online network", []))
            inside |= {id(m) for m in obj.modules()}
    frozen = {k: m for k, m in method.frozen_networks().items() if id(m) not in inside}
    if not frozen and cfg.fsdp_frozen != "auto":
        raise ConfigError(f"--fsdp_frozen {cfg.fsdp_frozen} has no effect: this run holds no frozen network outside "
                          "its trained ones (the teacher is the trained network, or carries its adapters): drop it")
    for name, m in frozen.items():
        size = module_bytes(m)
        if cfg.fsdp_frozen == "auto":
            shard = size >= FROZEN_SHARD_BYTES
            why = f"auto: {'at least' if shard else 'under'} {FROZEN_SHARD_BYTES >> 30} GiB"
        else:
            shard, why = cfg.fsdp_frozen == "shard", f"--fsdp_frozen {cfg.fsdp_frozen}"
        held.append(Held(name, m, "frozen", shard, why, []))
    return held


def others(bundle, held: list[Held]) -> list[tuple[str, torch.nn.Module]]:
    """The bundle's other parts (VAE, text encoders): whole on every rank."""
    inside = {id(m) for h in held for m in h.module.modules()}
    if bundle is None:
        return []
    return [(k, m) for k, m in bundle.modules().items() if id(m) not in inside]


def report(held: list[Held], rest: list[tuple[str, torch.nn.Module]], n: int, ddp: bool = True) -> str:
    """The table --dry_run and the trainer's log show: bytes per rank under --fsdp (and under DDP)."""
    gib = 2 ** 30
    lines = [f"sharding on {n} process(es): what each rank holds (weights + gradients + AdamW moments; "
             "activations not included)",
             f"  {'network':<12} {'role':<8} {'params':>10} {'dtype':<10} {'held':<11} {'per rank GiB':>12}"
             + (f" {'DDP GiB':>8}" if ddp else "") + "  why"]
    tot = tot_ddp = 0
    for h in held:
        mine = h.per_rank(n)["total"]
        whole = Held(h.name, h.module, h.role, False, "", h.trainable).per_rank(1)["total"]
        tot, tot_ddp = tot + mine, tot_ddp + whole
        lines.append(f"  {h.name:<12} {h.role:<8} {h.params / 1e6:>9.1f}M {h.dtypes():<10} "
                     f"{'sharded' if h.shard else 'replicated':<11} {mine / gib:>12.3f}"
                     + (f" {whole / gib:>8.3f}" if ddp else "") + f"  {h.why}")
    for name, m in rest:
        b = module_bytes(m)
        tot, tot_ddp = tot + b, tot_ddp + b
        params = sum(p.numel() for p in m.parameters())
        lines.append(f"  {name:<12} {'frozen':<8} {params / 1e6:>9.1f}M "
                     f"{Held(name, m, '', False, '', []).dtypes():<10} {'replicated':<11} {b / gib:>12.3f}"
                     + (f" {b / gib:>8.3f}" if ddp else "") + "  VAE / text encoders stay whole")
    lines.append(f"  {'total':<12} {'':<8} {'':>10} {'':<10} {'':<11} {tot / gib:>12.3f}"
                 + (f" {tot_ddp / gib:>8.3f}" if ddp else ""))
    return "\n".join(lines)


# ---- the sharding itself ---------------------------------------------------------------------------

def ensure_process_group(acc) -> None:
    """A one-process run under --fsdp still shards on a (one-rank) device mesh: the same code, the same
    checkpoint format, CPU offload on one GPU. accelerate starts no process group for one process."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = "cuda:nccl,cpu:gloo" if acc.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


class Sharding:
    """The run's sharding: built by the trainer when --fsdp is on, after the method built its networks."""

    def __init__(self, cfg, acc):
        from torch.distributed.device_mesh import init_device_mesh

        self.cfg, self.acc = cfg, acc
        ensure_process_group(acc)
        self.n = acc.num_processes
        self.mesh = init_device_mesh(acc.device.type, (self.n,))
        self.held: list[Held] = []

    def _policy(self, module: torch.nn.Module, role: str):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        from ..models.bundle import weight_dtype_of

        wdt = weight_dtype_of(self.cfg.mixed_precision)
        dtypes = {p.dtype for p in module.parameters()}
        if role == "trained" and wdt != torch.float32:
            # gathered in the compute dtype, reduced in fp32: the fp32 shards stay the master weights
            return MixedPrecisionPolicy(param_dtype=wdt, reduce_dtype=torch.float32)
        if len(dtypes) > 1:  # one all-gather buffer per unit needs one dtype
            return MixedPrecisionPolicy(param_dtype=wdt if wdt in dtypes else min(dtypes, key=lambda d: d.itemsize))
        return MixedPrecisionPolicy()

    def shard_network(self, net: torch.nn.Module, role: str) -> int:
        """Shard ``net`` unit by unit, then each of its roots; returns the number of units."""
        from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

        kw = dict(mesh=self.mesh, mp_policy=self._policy(net, role),
                  offload_policy=CPUOffloadPolicy() if self.cfg.fsdp_offload else OffloadPolicy(),
                  reshard_after_forward=self.cfg.fsdp_reshard_after_forward)
        count = 0
        for root in roots_of(net):
            units = units_of(root, self.cfg.fsdp_wrap)
            for unit in reversed(units):  # inner blocks before the blocks that contain them
                fully_shard(unit, **kw)
            # (explicitly, not FSDP's root heuristic of keeping a root gathered after forward: a forward
            # without backward — DMD2's generator sampling for the fake score's step, a validation
            # sample — would then leave it gathered across an optimizer step of its shards)
            fully_shard(root, **kw)
            count += len(units) + 1
        return count

    def init_now(self, h: Held, trained_names: set[str]) -> None:
        """FSDP's lazy initialisation, run now rather than at the first forward: it fixes each unit's
        gradient dtypes from the parameters that require gradients at that moment, and a method may have
        frozen a trained network for its other phase by then (DMD2's generator during a fake-score step),
        which would leave that network's gradients unreduced in the mixed-precision dtype."""
        params = dict(h.module.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        for n in trained_names:
            params[n].requires_grad_(True)
        try:
            for root in roots_of(h.module):
                root._get_fsdp_state()._lazy_init()
        finally:
            for n, p in params.items():
                p.requires_grad_(flags[n])

    def shard(self, method, groups: dict) -> None:
        """Shard the method's networks per :func:`plan`; the trainer asks the method for its groups again
        afterwards (their parameters are now the sharded ones)."""
        self.held = plan(method, self.cfg, groups)
        if self.cfg.fsdp_wrap:
            known = {type(m).__name__ for h in self.held for m in h.module.modules()}
            unknown = [c for c in self.cfg.fsdp_wrap if c not in known]
            if unknown:
                raise ConfigError(f"--fsdp_wrap {','.join(unknown)}: no module of this run's networks has that class; "
                                  f"the networks' classes include {', '.join(sorted(known)[:40])}")
        for h in self.held:
            if h.shard:
                trained = {id(p) for p in h.trainable}
                names = {n for n, p in h.module.named_parameters() if id(p) in trained}
                units = self.shard_network(h.module, h.role)
                self.init_now(h, names)
                h.why += f" ({units} units)"
        log.info(report(self.held, others(method.bundle, self.held), self.n))

    def relocate(self, method, device: torch.device) -> None:
        """Move what is not sharded (frozen parts kept whole, the schedule tables, small modules) from the
        build device to the training device."""
        from .speed import held_networks

        for net in held_networks(method, method.bundle):
            for m in net.modules():
                for p in list(m._parameters.values()):
                    if p is not None and not is_sharded(p) and p.device != device:
                        p.data = p.data.to(device)
                for k, b in list(m._buffers.items()):
                    if b is not None and not is_sharded(b) and b.device != device:
                        m._buffers[k] = b.to(device)
        for owner in (method, method.bundle):
            for value in list(getattr(owner, "__dict__", {}).values()):
                if hasattr(value, "alpha_sigma") and hasattr(value, "to"):  # a noise schedule
                    value.to(device)
        if method.bundle is not None:
            method.bundle._uncond = None

    def json_objects(self, objects: dict[str, Any]) -> dict[str, Any]:
        """The method's stateful objects that fewstep's JSON/safetensors state holds (not sharded ones)."""
        sharded = {id(h.module) for h in self.held if h.role == "state"}
        return {k: o for k, o in objects.items() if id(o) not in sharded}

    def reshard(self) -> None:
        """Every sharded network back to its shards (a trained root stays gathered after a forward run
        without backward, such as a validation sample): what checkpoints and exports read."""
        from torch.distributed.fsdp import FSDPModule

        for h in self.held:
            for m in h.module.modules():
                if isinstance(m, FSDPModule):
                    m.reshard()

    # ---- checkpoints ------------------------------------------------------------------------------
    def _state(self, optimizers: dict[str, Any]) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        self.reshard()
        nets = {h.name: h for h in self.held if h.role in ("trained", "state")}
        state: dict[str, Any] = {"networks": {n: get_model_state_dict(h.module) for n, h in nets.items()}}
        state["optimizers"] = {n: get_optimizer_state_dict(nets[n].module, _inner(opt))
                               for n, opt in optimizers.items()}
        return state

    def save(self, folder: Path, optimizers: dict[str, Any]) -> None:
        """Every rank writes its shards of every network and optimizer into ``folder/sharded`` (collective)."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._state(optimizers), checkpoint_id=str(Path(folder) / SHARDED_DIR))

    def load(self, folder: Path, optimizers: dict[str, Any]) -> None:
        """Load ``folder/sharded`` into this run's shards, whatever number of processes wrote it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state(optimizers)
        dcp.load(state, checkpoint_id=str(Path(folder) / SHARDED_DIR))
        nets = {h.name: h for h in self.held if h.role in ("trained", "state")}
        for n, sd in state["networks"].items():
            set_model_state_dict(nets[n].module, sd)
        for n, osd in state["optimizers"].items():
            set_optimizer_state_dict(nets[n].module, _inner(optimizers[n]), osd)

    # ---- exports ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def full_weights(self, is_main: bool):
        """Gather the full weights of every trained and stateful network into the CPU memory of the main
        process (every rank runs the gather); inside the block, on the main process, ``state_dict()`` of
        those networks and of each of their submodules returns the full weights, so a method's export
        (``save_pretrained``, peft's LoRA state dict) writes what an unsharded run would."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        self.reshard()
        fulls = [(h.module, get_model_state_dict(h.module, options=opts))
                 for h in self.held if h.role in ("trained", "state") and h.shard]
        if not is_main:
            yield
            return
        patched: list[torch.nn.Module] = []
        for root, full in fulls:
            for prefix, sub in root.named_modules():
                if "state_dict" in sub.__dict__:
                    continue  # (a module shared by two networks: the first one's view)
                sub.state_dict = _full_view(full, f"{prefix}." if prefix else "")
                patched.append(sub)
        try:
            yield
        finally:
            for sub in patched:
                del sub.state_dict


def _full_view(full: dict[str, torch.Tensor], prefix: str):
    from collections import OrderedDict

    def state_dict(*args, destination=None, prefix_: str = "", keep_vars: bool = False, **kw):
        out = OrderedDict((k[len(prefix):], v) for k, v in full.items() if k.startswith(prefix))
        if destination is not None:
            destination.update(out)
            return destination
        return out

    return state_dict


def _inner(opt):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(opt, "optimizer", opt)


# ---- --dry_run: the same plan on networks built without memory -------------------------------------

def meta_bundle(light):
    """The teacher bundle read as configs (``weights=False``) with every model part built on the meta
    device from its config: sizes and dtypes without weights or memory."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    for name, part in list(light.parts.items()):
        if not isinstance(part, dict):
            continue
        with init_empty_weights():
            if "_class_name" in part:  # a diffusers model config
                module = getattr(diffusers, part["_class_name"]).from_config(part)
            elif part.get("architectures"):  # a transformers model config
                cls = getattr(transformers, part["architectures"][0])
                module = cls(cls.config_class.from_dict(part))
            else:
                continue
        light.parts[name] = module.requires_grad_(False).eval()
    return light


def dry_run_plan(spec, light, processes: int) -> tuple[list[Held], list[tuple[str, torch.nn.Module]]]:
    """The method built on the meta device (its real code, no memory) and the plan of :func:`plan`: the
    networks it holds and how, and the bundle's other parts."""
    import types

    from accelerate import init_empty_weights

    cfg = spec.train
    acc = types.SimpleNamespace(device=torch.device("meta"), num_processes=processes, process_index=0,
                                is_main_process=True, unwrap_model=lambda m: m)
    bundle = meta_bundle(light) if light is not None else None
    with init_empty_weights():  # parameters on the meta device, other tensors (schedules) real
        method = spec.method_cls(cfg, spec.method, bundle, acc)
    held = plan(method, cfg, method.groups())
    return held, others(bundle, held)


def dry_run_report(spec, light, processes: list[int]) -> str:
    """What ``--dry_run`` prints under --fsdp: the bytes each rank holds, for each number of processes."""
    held, rest = dry_run_plan(spec, light, max(processes))
    return "\n".join(report(held, rest, n, ddp=i == 0) for i, n in enumerate(processes))
