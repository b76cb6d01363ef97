"""Random streams per micro-batch (``--rng_streams batch``): a run that is the same on any number of
processes, and resumes exactly on another number.

By default (``rank``) each process draws from its own stream (``--seed`` + rank), so N processes see
other noise than one process, and a checkpoint holds one RNG state per rank. With ``batch`` every random
draw of a micro-batch's step (noise, timesteps, guidance scales, caption dropout, LoRA dropout) comes from
torch's generators re-seeded from (``--seed``, epoch, the micro-batch's place in the epoch's global batch
order) just before the method's loss runs. That place is the same whichever process runs the micro-batch:
under accelerate's batch sharding, the b-th batch a rank r of N reads is the (b·N + r)-th of the epoch,
which is what one process with N times the gradient accumulation reads as its (b·N + r)-th micro-batch.
So a run on N processes with per-device batch B and G accumulation steps equals a run on M processes with
the same B and G·N/M accumulation steps (up to float summation order), and no RNG state needs restoring
on resume.
"""

from __future__ import annotations

import hashlib

import torch


def batch_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed of (seed, epoch, global micro-batch position), decorrelated by a hash."""
    h = hashlib.blake2b(f"fewstep:{seed}:{epoch}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def reseed(seed: int, epoch: int, position: int) -> None:
    """Seed torch's CPU and accelerator generators for the micro-batch at ``position`` of ``epoch``."""
    torch.manual_seed(batch_seed(seed, epoch, position))  # (seeds every CUDA device too)


def global_position(batch_in_epoch: int, process_index: int, num_processes: int) -> int:
    """The global place of the micro-batch a rank reads as its ``batch_in_epoch``-th (0-based) batch."""
    return batch_in_epoch * num_processes + process_index


def relayout(state, now: dict, is_map: bool, ckpt) -> None:
    """Continue a checkpoint written by another number of processes: refuse what cannot continue exactly,
    else convert the data position (batches each rank read in this epoch) to this run's layout. ``now``
    and ``state.layout``: processes, train_batch_size, gradient_accumulation_steps, rng_streams."""
    from .checkpoint import ResumeMismatch

    old = getattr(state, "layout", None)
    if not old or old["processes"] == now["processes"]:
        return
    n0, n = old["processes"], now["processes"]
    a0, b0 = old["gradient_accumulation_steps"], old["train_batch_size"]
    why = None
    if old["rng_streams"] != "batch" or now["rng_streams"] != "batch":
        why = (f"it was written with --rng_streams {old['rng_streams']} and this run has {now['rng_streams']}: one "
               "random stream per process cannot be continued by another number of processes (new runs: "
               "--rng_streams batch, the default under --fsdp)")
    elif not is_map:
        why = "streamed data keeps its position per process and loader worker"
    elif now["train_batch_size"] != b0 or (n0 * a0) % n or now["gradient_accumulation_steps"] != n0 * a0 // n:
        fix = f"--gradient_accumulation_steps {n0 * a0 // n}" if (n0 * a0) % n == 0 else \
            f"a number of processes dividing {n0 * a0}"
        why = (f"the global batch must stay {b0} per device x {n0} process(es) x {a0} accumulation step(s): use "
               f"--train_batch_size {b0} and {fix}")
    if why:
        raise ResumeMismatch(f"--resume_from_checkpoint {ckpt}: written by {n0} process(es), this run has {n}; {why}")
    state.batch_in_epoch = state.batch_in_epoch * n0 // n
