"""Checkpoints: accelerate's save_state written atomically, with rotation that never loses the last
complete one.

accelerate saves every prepared model, optimizer, lr scheduler, GradScaler, RNG state and every
object passed to ``register_for_checkpointing``. We add atomicity: the state goes to a temporary
folder that is renamed to ``checkpoint-<step>`` only once complete, so a kill mid-save leaves the
previous checkpoint as ``latest``. (accelerate's own ``total_limit`` rotation deletes before the new
save is complete, which is why rotation is done here.) Every step that changes which folders exist is
one ``os.replace`` (atomic on POSIX), so a SIGKILL between any two of them leaves either the old or
the new complete checkpoint under its final name, or a complete one under a temporary name that
:func:`recover` renames back before a resume looks for ``latest``.

Fault injection (tests only): ``FEWSTEP_TEST_FAULT=<point>[@<step>]`` makes the process SIGKILL
itself at that point of a save; :func:`fault_point` is the one place it is read. Points, in order:
``save_state`` (inside accelerate's save_state, after the models, optimizers and RNG states are
written, before fewstep's own training state), ``before_marker``, ``before_rename`` (marker written),
``between_replace`` (re-saving a step: the old folder moved aside, the new one not yet in place),
``before_rotate`` (renamed, nothing rotated), ``during_rotate`` (one old checkpoint moved to the
trash, not yet deleted). Unset, it costs one dictionary lookup per save.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
from pathlib import Path

from ..config import ConfigError

COMPLETE = "fewstep_complete"  # marker written last inside the temporary folder
_PAT = re.compile(r"^checkpoint-(\d+)$")
FAULT_ENV = "FEWSTEP_TEST_FAULT"


def fault_point(point: str, step: int) -> None:
    """SIGKILL this process here when ``FEWSTEP_TEST_FAULT`` names this point (and step): tests only."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, at = spec.partition("@")
    if name == point and (not at or int(at) == step):
        os.kill(os.getpid(), signal.SIGKILL)


class CheckpointError(RuntimeError):
    pass


# Settings that decide which parameters are trained and how the optimizer state is laid out: a
# checkpoint written under other values cannot be loaded into this run's models and optimizers.
RESUME_KEYS = ("method", "is_lora", "lora_rank", "lora_target_modules", "fake_score_lora_rank",
               "fake_score_lora_target_modules", "unet_time_cond_proj_dim", "use_8bit_adam", "gan_head",
               "regression_only")


def check_resume_settings(ckpt: Path, settings: dict) -> None:
    """Refuse to resume ``ckpt`` when its run's recorded settings (the ``fewstep_config.yaml`` of the
    run that wrote it) differ from ``settings`` in a :data:`RESUME_KEYS` key; keys one side lacks are
    not compared. A checkpoint without a recorded config passes (the load itself is still guarded)."""
    import yaml

    recorded = Path(ckpt).parent / "fewstep_config.yaml"
    if not recorded.is_file():
        return
    old = yaml.safe_load(recorded.read_text()) or {}
    diff = [k for k in RESUME_KEYS if k in old and k in settings and old[k] != settings[k]]
    if diff:
        what = ", ".join(f"--{k} {old[k]!r} there, {settings[k]!r} now" for k in diff)
        raise ResumeMismatch(
            f"--resume_from_checkpoint {ckpt}: that run was trained with other settings ({what}), which change "
            "the trained parameters or the optimizer state. Resume with the same settings (see "
            f"{recorded}), or start a new run with another --output_dir")


class ResumeMismatch(CheckpointError, ConfigError):
    """A checkpoint that this run's configuration cannot load: a bad input (the command exits 2)."""


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = _PAT.match(p.name)
            if m and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(out_dir: Path, spec: str | None) -> Path | None:
    """``latest`` → newest complete checkpoint (None when there is none yet); else the given folder."""
    if not spec:
        return None
    if spec == "latest":
        ckpts = list_checkpoints(out_dir)
        return ckpts[-1][1] if ckpts else None
    p = Path(spec)
    if not p.is_absolute() and not p.exists():
        p = out_dir / spec
    if not (p / COMPLETE).is_file():
        raise CheckpointError(
            f"--resume_from_checkpoint {spec}: {p} is not a complete fewstep checkpoint "
            f"(complete ones: {[c.name for _, c in list_checkpoints(out_dir)] or 'none'}); use 'latest'"
        )
    return p


def save_checkpoint(accelerator, out_dir: Path, step: int, total_limit: int | None) -> Path:
    """Save to ``.tmp-checkpoint-<step>``, then rename; rotate older complete checkpoints."""
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            fault_point("before_marker", step)
            (tmp / COMPLETE).write_text(str(step))
            fsync_tree(tmp)
            fault_point("before_rename", step)
            old = out_dir / f".old-checkpoint-{step}"
            if final.exists():  # re-saving the same step (resume then signal): swap, never delete first
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                fault_point("between_replace", step)
            os.replace(tmp, final)
            fsync_dir(out_dir)
            shutil.rmtree(old, ignore_errors=True)
            fault_point("before_rotate", step)
            rotate(out_dir, total_limit, step)
    except OSError as e:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            prev = list_checkpoints(out_dir)
            raise CheckpointError(
                f"disk full while saving checkpoint-{step} in {out_dir}; the previous checkpoint "
                f"{prev[-1][1] if prev else '(none)'} is intact. Free space or lower --checkpoints_total_limit, "
                "then resume with --resume_from_checkpoint latest"
            ) from None
        raise
    accelerator.wait_for_everyone()
    return final


def recover(out_dir: Path) -> list[str]:
    """Undo what a kill in the middle of :func:`save_checkpoint` left: a complete temporary or
    moved-aside folder whose final name is free goes back to that name; the rest is removed.
    Run by the main process before resolving ``latest``; returns what it did, for the log."""
    done = []
    if not Path(out_dir).is_dir():
        return done
    for prefix in (".tmp-checkpoint-", ".old-checkpoint-"):  # the newer state wins
        for p in sorted(Path(out_dir).glob(prefix + "*")):
            final = Path(out_dir) / p.name[len(prefix) - len("checkpoint-"):]
            if (p / COMPLETE).is_file() and not final.exists():
                os.replace(p, final)
                done.append(f"restored {final.name} from {p.name}")
            else:
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed incomplete {p.name}")
    for p in Path(out_dir).glob(".trash-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    return done


def fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make renames inside ``path`` durable (a power loss, not only a killed process)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rotate(out_dir: Path, total_limit: int | None, step: int = -1) -> None:
    """Keep the newest ``total_limit`` complete checkpoints; drop stale temporary folders. An old
    checkpoint is first renamed out of the ``checkpoint-N`` namespace, so a kill in the middle of
    deleting it can never leave a half-deleted folder that still looks complete."""
    for p in out_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    if not total_limit:
        return
    ckpts = list_checkpoints(out_dir)
    for _, p in ckpts[: max(0, len(ckpts) - total_limit)]:
        trash = out_dir / (".trash-" + p.name)
        os.replace(p, trash)
        fault_point("during_rotate", step)
        shutil.rmtree(trash, ignore_errors=True)
