"""``fewstep export --from_checkpoint CKPT --output_dir OUT``: the student a run would have exported, from
one of its checkpoints, in one process on the CPU.

The checkpoint is verified against its manifest, the run's settings are read from it (``config`` of its
``fewstep_state.json``), the method is built as the run built it (the teacher folder must still be
there; nothing is trained, no data is read), the networks get the checkpoint's weights — from the
sharded state of an --fsdp run (``torch.distributed.checkpoint`` reads every rank's file and joins the
shards: no process group, any number of processes wrote it), from a DeepSpeed run's ZeRO partitions (its
fp32 master weights, joined by DeepSpeed's own reader: training/zero.py), or from accelerate's model files — and the
method's own export writes the folder, atomically, with its model card and ``fewstep_config.yaml``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..config import ConfigError
from . import zero
from .checkpoint import SHARDED_DIR, STATE_JSON, CheckpointError, read_state, verify_checkpoint

log = logging.getLogger("fewstep")


def export_checkpoint(ckpt: Path, out_dir: Path) -> Path:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from ..config import resolve
    from ..export import ExportError, atomic_export, write_model_card
    from ..methods import REGISTRY
    from .trainer import TrainState

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if not ckpt.is_dir():
        raise ConfigError(f"--from_checkpoint {ckpt}: no such folder (a checkpoint-<step> folder of a run)")
    verify_checkpoint(ckpt)
    doc = json.loads((ckpt / STATE_JSON).read_text())
    config = doc.get("config")
    if not config:
        raise CheckpointError(f"--from_checkpoint {ckpt}: it records no run settings (written before fewstep kept "
                              "them in the checkpoint); export it by resuming the run instead")
    if Path(out_dir).resolve() == ckpt.parent.resolve():
        raise ConfigError(f"--output_dir {out_dir} is the run's own folder: choose another one (the run exports there "
                          "itself)")
    if config.get("method") not in REGISTRY:
        raise ConfigError(f"--from_checkpoint {ckpt}: method {config.get('method')!r} is not one of "
                          f"{', '.join(REGISTRY)}")
    # The run's settings, made for one process: no launcher or resume, the cache's text embeddings not
    # needed (the text encoders load from the teacher folder instead).
    raw = {k: v for k, v in config.items() if k not in ("resume_from_checkpoint", "dry_run")}
    raw["cache_dir"] = None
    if config.get("cache_dir") and "vae_encode_batch_size" in raw:
        raw.pop("vae_encode_batch_size")
    spec = resolve(raw, REGISTRY)
    cfg, mcfg, cls = spec.train, spec.method, spec.method_cls
    state = TrainState()
    AcceleratorState._reset_state()
    acc = Accelerator(cpu=True, mixed_precision=cfg.mixed_precision)
    bundle = cls.make_bundle(cfg, mcfg)
    method = cls(cfg, mcfg, bundle, acc)
    groups = method.groups()
    nets = {name: g.module for name, g in groups.items()}
    stateful = method.stateful()
    have = doc.get("objects", {})
    if (ckpt / SHARDED_DIR).is_dir():
        import torch.distributed.checkpoint as dcp

        nets.update({k: o for k, o in stateful.items() if isinstance(o, torch.nn.Module) and k not in have})
        sds = {"networks": {name: net.state_dict() for name, net in nets.items()}}
        dcp.load(sds, checkpoint_id=str(ckpt / SHARDED_DIR))  # (no process group: one reader joins the shards)
        for name, net in nets.items():
            net.load_state_dict(sds["networks"][name])
    elif zero.checkpoint_tags(ckpt):  # written by a DeepSpeed engine: its fp32 master weights, joined
        for i, (name, net) in enumerate(nets.items()):
            net.load_state_dict(zero.consolidated(ckpt, i, name))
    else:
        from safetensors.torch import load_file

        for i, (name, net) in enumerate(nets.items()):
            f = ckpt / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            if not f.is_file():
                raise CheckpointError(f"--from_checkpoint {ckpt}: {f.name} (the {name} network) is missing")
            net.load_state_dict(load_file(str(f)))
    read_state(ckpt, state, {k: o for k, o in stateful.items() if k in have})
    method.bind(nets)
    if state.good_steps == 0:
        raise ExportError(f"--from_checkpoint {ckpt}: no optimizer step of the run had succeeded when it was written; "
                          "there is no trained student to export")
    facts = atomic_export(out_dir, method.export)
    write_model_card(out_dir, cfg.pretrained_teacher_model, cfg.method, facts,
                     load_args=bundle.card_load_args() if bundle is not None else "",
                     call_kwargs=bundle.call_kwargs() if bundle is not None else None)
    spec.dump(out_dir / "fewstep_config.yaml")
    return out_dir
