"""Checkpoints: accelerate's save_state written atomically, with rotation that never loses the last
complete one.

accelerate saves every prepared model, optimizer, lr scheduler, GradScaler, RNG state and every
object passed to ``register_for_checkpointing``. We add atomicity: the state goes to a temporary
folder that is renamed to ``checkpoint-<step>`` only once complete, so a kill mid-save leaves the
previous checkpoint as ``latest``. (accelerate's own ``total_limit`` rotation deletes before the new
save is complete, which is why rotation is done here.)
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

COMPLETE = "fewstep_complete"  # marker written last inside the temporary folder
_PAT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    pass


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
            (tmp / COMPLETE).write_text(str(step))
            fsync_tree(tmp)
            if final.exists():  # re-saving the same step (resume then signal): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            rotate(out_dir, total_limit)
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


def fsync_tree(path: Path) -> None:
    for p in path.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def rotate(out_dir: Path, total_limit: int | None) -> None:
    """Keep the newest ``total_limit`` complete checkpoints; drop stale temporary folders."""
    for p in out_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    if not total_limit:
        return
    ckpts = list_checkpoints(out_dir)
    for _, p in ckpts[: max(0, len(ckpts) - total_limit)]:
        shutil.rmtree(p, ignore_errors=True)
