"""`fewstep distill` for the sharding tests, run under torchrun or as one process: the same trainer, plus
two records the tests compare, written by the main process into OUT:

- ``losses.json``: per optimizer step, the global-batch loss — each micro-batch's loss averaged over the
  ranks (one all-reduce inside the loss, as every rank computes one), then over the micro-batches of the
  step: what one process with the same global batch computes as its mean;
- ``held_rank<r>.json`` (every rank): the bytes of parameters and optimizer state this rank holds after
  training, per trainable group (its shard of a sharded tensor).

Usage: python tests/shard_driver.py --method lcm --pretrained_teacher_model ... (the distill options).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def held_bytes(trainer) -> dict:
    from fewstep.training.sharding import local_bytes

    out = {}
    for name, opt in trainer.opts.items():
        opt = getattr(opt, "optimizer", opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        module = trainer.modules[name]
        state = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0]
        out[name] = {"module_params": local_bytes(module.parameters()), "trained_params": local_bytes(params),
                     "optimizer_state": local_bytes(state)}
    return out


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    from fewstep.cli import parse_run
    from fewstep.training.trainer import Trainer

    spec = parse_run(argv)
    tr = Trainer(spec)
    acc, losses = tr.acc, {}
    loss_of = tr.method.loss

    def recorded(phase, batch, step):
        out = loss_of(phase, batch, step)
        v = out.loss.detach().float().clone()
        if acc.num_processes > 1:
            v = acc.reduce(v, reduction="mean")
        losses.setdefault(step, []).append(float(v))
        return out

    tr.method.loss = recorded
    result = tr.train()
    out = Path(spec.train.output_dir)
    (out / f"held_rank{acc.process_index}.json").write_text(json.dumps(held_bytes(tr)))
    if acc.is_main_process:
        (out / "losses.json").write_text(json.dumps({str(k): sum(v) / len(v) for k, v in sorted(losses.items())}))
    if tr.stopped_by:
        return 128 + tr.stopped_by
    return 0 if result is not None or not acc.is_main_process else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
