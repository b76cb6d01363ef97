"""DeepSpeed ZeRO through ``accelerate launch`` with a DeepSpeed config (configs/accelerate/deepspeed_zero*.yaml):
how the trainer's Accelerator and the engine's config are set up for it, the autocast accelerate leaves
out under DeepSpeed, the gathers of the parameters ZeRO-3 partitions (EMA updates, exports of the fp32
master weights), and reading an engine's checkpoint partitions back in one process.

accelerate gives one DeepSpeed engine per run, so a method with one trainable network runs under it (lcm
and lcm LoRA are tested: tests/test_deepspeed.py; direct has one too, untested there); runs with several
are refused, fewstep's own sharding (--fsdp, training/sharding.py) covers them.

CPU processes. accelerate's DeepSpeed path is taken only with ``Accelerator(cpu=False)`` (``cpu=True`` falls
back to a plain gloo DDP run, silently), and on a machine without a GPU it finds no process-group backend
by itself (it would leave every rank believing it runs alone): the trainer asks for gloo, which DeepSpeed's
CPU accelerator uses. That is how the tests run ZeRO-2 and ZeRO-3 on two CPU processes.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch


def launched() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group_kwargs() -> list:
    """accelerate kwargs handlers: the gloo backend for DeepSpeed on CPU processes (see the module doc)."""
    if not launched() or torch.cuda.is_available():
        return []
    from accelerate.utils import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(backend="gloo")]


def stage(acc) -> int | None:
    """The ZeRO stage of an accelerate DeepSpeed run, else None."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", None) if plugin is not None else None


def configure(acc, cfg) -> None:
    """What the DeepSpeed config leaves to the program: the batch size per device (fewstep prepares its
    data loader apart from the networks, so accelerate cannot read it there) and the clipping bound."""
    if stage(acc) is None:
        return
    plugin = acc.state.deepspeed_plugin
    # accelerate registers its ZeRO-3 config with transformers whatever zero3_init_flag says, and
    # transformers then builds every model it loads partitioned (deepspeed.zero.Init): the frozen text
    # encoder would hold empty parameters that no engine ever gathers. fewstep builds its networks whole
    # (zero3_init_flag true is refused: config.py); the engine partitions the trained one.
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    ds = plugin.deepspeed_config
    if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        ds["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
    if ds.get("gradient_clipping", "auto") == "auto":
        # (accelerate would fill in 1.0; a config without the key would not clip at all): --max_grad_norm,
        # which config.apply_deepspeed_settings made the config's value where it gives one
        ds["gradient_clipping"] = max(float(cfg.max_grad_norm), 0.0)


def autocast(acc):
    """The mixed-precision autocast of a DeepSpeed run (else a no-op; accelerate's own ``autocast()`` does it
    there). accelerate turns its autocast off under DeepSpeed, whose engine holds the trained network in
    fp16/bf16 itself; but the method's other networks (the frozen teacher and EMA target in fp32, the VAE)
    would then run in fp32, and the trained one with its norms and softmax in half precision: each
    unlike a run without DeepSpeed (measured on the tiny SD teacher, bf16: step losses 4 % off, 0.2 % with
    this autocast)."""
    if stage(acc) is None or acc.mixed_precision not in ("fp16", "bf16"):
        return contextlib.nullcontext()
    dtype = torch.float16 if acc.mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=acc.device.type, dtype=dtype)


def check_groups(acc, groups: dict) -> None:
    """One trained network per DeepSpeed run: accelerate builds one engine (one model, one optimizer)."""
    if stage(acc) is not None and len(groups) > 1:
        from ..config import ConfigError

        raise ConfigError(f"this run trains {len(groups)} networks ({', '.join(groups)}), each with its own optimizer; "
                          "accelerate's DeepSpeed integration gives a run one engine (one network): launch it with "
                          "configs/accelerate/fsdp.yaml (fewstep shards every network itself) or multi_gpu.yaml")


def partitioned(p) -> bool:
    """Whether ZeRO-3 holds ``p`` partitioned: its ``data`` is a placeholder outside a gather (a forward
    of its module gathers it by itself; code that reads or writes the tensor directly must gather)."""
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def full_parameters(params, modify: bool = False):
    """Inside the block the ZeRO-3-partitioned ones among ``params`` hold their full values on every rank (a
    collective every rank runs, in the same order); others are left as they are. ``modify``: what the block
    writes into them is kept (rank 0's values, re-partitioned on the way out), else it is dropped."""
    parts = [p for p in params if partitioned(p)]
    if not parts:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(parts, modifier_rank=0 if modify else None):
        yield


def dtypes(module: torch.nn.Module) -> dict[str, torch.dtype]:
    """The dtype of each parameter as the method built it, read before the engine takes the module (a
    DeepSpeed fp16/bf16 engine casts the whole module, frozen weights and trained ones alike)."""
    return {n: p.dtype for n, p in module.named_parameters()}


@contextlib.contextmanager
def full_weights(nets: list[tuple[torch.nn.Module, dict[str, torch.dtype]]]):
    """The trained networks as an unsharded run holds them, for an export (every rank runs this; collective):
    inside the block each network's parameters hold their full values in the dtypes the method built them in,
    the trained ones being DeepSpeed's fp32 master weights (what its optimizer steps; under fp16/bf16 the
    module itself only holds a half-precision copy). Restored on the way out. ``nets``: (module, its
    :func:`dtypes` from before the engine)."""
    from deepspeed.utils import safe_get_full_fp32_param

    with contextlib.ExitStack() as stack:
        swapped = []
        for net, built in nets:
            named = list(net.named_parameters())
            stack.enter_context(full_parameters([p for _, p in named]))
            for name, p in named:
                master = safe_get_full_fp32_param(p) if p.requires_grad else None
                value = (master if master is not None else p.data).to(built.get(name, p.dtype))
                if value is not p.data:
                    swapped.append((p, p.data))
                    p.data = value.reshape(p.shape)
        try:
            yield
        finally:
            for p, data in swapped:  # (before the gathers end: they release the tensors they gathered)
                p.data = data


# ---- checkpoints ---------------------------------------------------------------------------------
# accelerate's save_state under DeepSpeed has each engine write its own folder, ``pytorch_model`` (then
# ``pytorch_model_1``, ...), every rank its partitions of the module and of the optimizer's fp32 master
# weights, plus a ``latest`` file naming the folder. fewstep's manifest lists every file the ranks wrote.

def checkpoint_tags(ckpt: Path) -> list[str]:
    """The engines' folders in a checkpoint written under DeepSpeed (none otherwise)."""
    ckpt = Path(ckpt)
    return sorted(d.name for d in ckpt.glob("pytorch_model*") if d.is_dir() and any(d.glob("*_model_states.pt")))


def consolidated(ckpt: Path, index: int, name: str) -> dict[str, torch.Tensor]:
    """The full state dict of the ``index``-th prepared network of a DeepSpeed checkpoint (the trained
    parameters from the optimizer's fp32 master partitions, the frozen ones from the module's), joined in
    this process: no process group, whatever number of ranks wrote it."""
    tag = "pytorch_model" if index == 0 else f"pytorch_model_{index}"
    if not (Path(ckpt) / tag).is_dir():
        from .checkpoint import CheckpointError

        raise CheckpointError(f"{ckpt}: {tag}/ (the {name} network's DeepSpeed partitions) is missing")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        from ..config import ConfigError

        raise ConfigError(f"{ckpt} was written by a DeepSpeed run; reading its partitions needs deepspeed: "
                          "pip install 'fewstep[deepspeed]' (see tests/test_deepspeed.py for a CPU-only "
                          "install)") from None
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
