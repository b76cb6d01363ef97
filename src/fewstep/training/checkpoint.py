"""Checkpoints: written atomically, verified before anything loads, stored without pickles of our own.

A checkpoint folder holds what accelerate's ``save_state`` writes (models as safetensors, optimizer,
lr scheduler, GradScaler and RNG states, which torch pickles and accelerate reads back with torch's
weights-only loader) plus fewstep's own state: counters and data positions in ``fewstep_state.json``,
the tensors of the method's stateful objects (EMA/target networks, ...) in ``fewstep_state.safetensors``,
each object under its :meth:`Method.stateful` name. Neither format can run code when read.

Atomicity: the state goes to a temporary folder that is renamed to ``checkpoint-<step>`` only once
complete, so a kill mid-save leaves the previous checkpoint as ``latest``. The last file written before
the rename is the manifest ``fewstep_complete``: every other file with its size and SHA-256. (accelerate's
own ``total_limit`` rotation deletes before the new save is complete, which is why rotation is done here.)
Every step that changes which folders exist is one ``os.replace`` (atomic on POSIX), so a SIGKILL between
any two of them leaves either the old or the new complete checkpoint under its final name, or a complete
one under a temporary name that :func:`recover` renames back before a resume looks for ``latest``.

Integrity: before anything loads, the chosen checkpoint is checked against its manifest. ``latest``
skips a damaged checkpoint (it is renamed ``damaged-checkpoint-<step>`` and the log says why) and takes
the newest intact one; an explicit ``--resume_from_checkpoint PATH`` that fails stops with the file named.
Checkpoints written before manifests existed (the marker holds the step number, the state is in
``custom_checkpoint_<i>.pkl``) still resume: their files are checked for presence only, and their pickles
are read with the weights-only loader, which refuses anything but tensors and plain containers.

Fault injection (tests only): ``FEWSTEP_TEST_FAULT=[pause:]<point>[@<step>]`` makes the process SIGKILL
itself at that point of a save (with ``pause:``, sleep 3 s there instead, so a test can send signals
during a save); :func:`fault_point` is the one place it is read. Points, in order: ``save_state`` (after
accelerate wrote models, optimizers and RNG states, before fewstep's own state), ``before_marker``,
``before_rename`` (manifest written), ``between_replace`` (re-saving a step: the old folder moved aside,
the new one not yet in place), ``before_rotate`` (renamed, nothing rotated), ``during_rotate`` (one old
checkpoint moved to the trash, not yet deleted). Unset, it costs one dictionary lookup per save.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..config import ConfigError

log = logging.getLogger("fewstep")

COMPLETE = "fewstep_complete"  # the manifest, written last inside the temporary folder
STATE_JSON = "fewstep_state.json"  # counters, data positions, non-tensor values of the method's objects
STATE_TENSORS = "fewstep_state.safetensors"  # tensors of the method's stateful objects
FORMAT = 2  # 1: the marker held the step, the state was pickled by accelerate (custom_checkpoint_<i>.pkl)
# Which run wrote the checkpoint (rotation only removes the current run's) and its training time so far. Not
# part of the training state: two runs to the same step have equal states and different ids and clocks.
RUN_FILE = "fewstep_run.json"
_PAT = re.compile(r"^checkpoint-(\d+)$")
FAULT_ENV = "FEWSTEP_TEST_FAULT"
# Settings of the trainer itself that decide the optimizer state's layout; each method adds its own
# (``Method.resume_keys``): a checkpoint written under other values cannot be loaded into this run.
TRAINER_RESUME_KEYS = ("method", "use_8bit_adam")


def fault_point(point: str, step: int) -> None:
    """SIGKILL this process (or pause 3 s) here when ``FEWSTEP_TEST_FAULT`` names this point: tests only."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    pause = spec.startswith("pause:")
    name, _, at = spec.removeprefix("pause:").partition("@")
    if name == point and (not at or int(at) == step):
        if pause:
            time.sleep(3)
        else:
            os.kill(os.getpid(), signal.SIGKILL)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names the folder (exit status 1)."""


class ResumeMismatch(CheckpointError, ConfigError):
    """A checkpoint that this run's configuration cannot load: a bad input (the command exits 2)."""


def check_resume_settings(ckpt: Path, settings: dict, keys=TRAINER_RESUME_KEYS) -> None:
    """Refuse to resume ``ckpt`` when the settings it was written under (recorded in the checkpoint, else
    the ``fewstep_config.yaml`` of its run) differ from ``settings`` in one of ``keys`` (the trainer's and
    the method's resume keys); keys one side lacks are not compared."""
    import yaml

    old, where = _recorded_config(Path(ckpt))
    if old is None:
        recorded = Path(ckpt).parent / "fewstep_config.yaml"
        if not recorded.is_file():
            return
        old, where = yaml.safe_load(recorded.read_text()) or {}, recorded
    diff = [k for k in keys if k in old and k in settings and old[k] != settings[k]]
    if diff:
        what = ", ".join(f"--{k} {old[k]!r} there, {settings[k]!r} now" for k in diff)
        raise ResumeMismatch(
            f"--resume_from_checkpoint {ckpt}: that run was trained with other settings ({what}), which change "
            "the trained parameters or the optimizer state. Resume with the same settings (see "
            f"{where}), or start a new run with another --output_dir")


def _recorded_config(ckpt: Path) -> tuple[dict | None, str]:
    try:
        state = json.loads((ckpt / STATE_JSON).read_text())
        return state.get("config"), f"{ckpt / STATE_JSON} (\"config\")"
    except (OSError, ValueError, AttributeError):
        return None, ""


# ---- finding checkpoints ------------------------------------------------------------------------

def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Checkpoints with their manifest (or old-style marker), oldest first; contents not verified."""
    found = []
    if Path(out_dir).is_dir():
        for p in Path(out_dir).iterdir():
            m = _PAT.match(p.name)
            if m and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _all_checkpoint_folders(out_dir: Path) -> list[tuple[int, Path]]:
    """Every ``checkpoint-N`` entry, complete or not, newest first."""
    if not Path(out_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(out_dir).iterdir() if (m := _PAT.match(p.name))]
    return sorted(found, reverse=True)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a checkpoint folder; None for an old-style (format 1) marker. Raises
    :class:`DamagedCheckpoint` when there is none or it is unreadable."""
    marker = Path(folder) / COMPLETE
    if not marker.is_file():
        raise DamagedCheckpoint(folder, f"{COMPLETE} (its manifest, written last) is missing: the save did not "
                                        "finish, or the file was deleted")
    try:
        data = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise DamagedCheckpoint(folder, f"{COMPLETE} (its manifest) is unreadable") from None
    if isinstance(data, int) and not isinstance(data, bool):
        return None  # format 1: the marker held the step number
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise DamagedCheckpoint(folder, f"{COMPLETE} (its manifest) is not a fewstep manifest")
    if data.pop("manifest_sha256", None) != _digest(data):
        raise DamagedCheckpoint(folder, f"{COMPLETE} (its manifest) does not match its own checksum")
    return data


def _digest(manifest: dict) -> str:
    """Checksum of the manifest's own content, so that a changed manifest is named as such."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


class DamagedCheckpoint(CheckpointError):
    def __init__(self, folder: Path, problem: str):
        super().__init__(f"{folder}: {problem}")
        self.folder, self.problem = Path(folder), problem


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)  # hashlib releases the GIL on large chunks: files hash in parallel
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(paths)))) as pool:
        return list(pool.map(_sha256, paths))


def verify_checkpoint(folder: Path) -> dict | None:
    """Check every file of ``folder`` against its manifest; raise :class:`DamagedCheckpoint` naming the
    first file that is missing, has another size or another checksum. Returns the manifest (None for an
    old-style checkpoint, whose needed files are checked for presence only)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DamagedCheckpoint(folder, "not a folder")
    if not any(folder.iterdir()):
        raise DamagedCheckpoint(folder, "the folder is empty")
    manifest = read_manifest(folder)
    if manifest is None:
        needed = ["custom_checkpoint_0.pkl", "random_states_0.pkl"]
        if not list(folder.glob("model*.safetensors")) and not list(folder.glob("pytorch_model*.bin")):
            needed.append("model.safetensors")
        for name in needed:
            if not (folder / name).is_file():
                raise DamagedCheckpoint(folder, f"{name} is missing")
        return None
    files = manifest["files"]
    for rel, meta in files.items():
        p = folder / rel
        if not p.is_file():
            raise DamagedCheckpoint(folder, f"{rel} is missing")
        size = p.stat().st_size
        if size != meta["size"]:
            raise DamagedCheckpoint(folder, f"{rel} has {size} bytes, its manifest says {meta['size']} (truncated "
                                            "or overwritten)")
    rels = list(files)
    for rel, digest in zip(rels, _hash_all([folder / r for r in rels])):
        if digest != files[rel]["sha256"]:
            raise DamagedCheckpoint(folder, f"{rel} does not match its SHA-256 checksum (changed since it was written)")
    for name in (STATE_JSON, "random_states_0.pkl"):
        if name not in files:  # a manifest written over a folder that lacked them
            raise DamagedCheckpoint(folder, f"{name} is missing")
    return manifest


def check_processes(folder: Path, num_processes: int) -> None:
    """An exact resume restores every rank's RNG state and data position: the checkpoint must hold
    them for exactly this run's number of processes."""
    have = sorted(int(m.group(1)) for p in Path(folder).glob("random_states_*.pkl")
                  if (m := re.match(r"random_states_(\d+)\.pkl$", p.name)))
    if have != list(range(num_processes)):
        n = len(have)
        raise ResumeMismatch(
            f"--resume_from_checkpoint {folder}: it holds the RNG states and data positions of {n} process(es) "
            f"(random_states_*.pkl), this run has {num_processes}. Resume with {n} process(es); a different "
            "number would silently change the data order and the noise")


def resolve_resume(out_dir: Path, spec: str | None, num_processes: int = 1) -> tuple[Path | None, list[str]]:
    """(checkpoint to resume, what was skipped and why). ``latest`` → the newest checkpoint that passes
    :func:`verify_checkpoint` (damaged newer ones are renamed ``damaged-checkpoint-N``); None when there is
    none yet. An explicit folder must pass, or :class:`CheckpointError` names the damaged file.
    Run by the main process only: it reads every byte of the chosen checkpoint."""
    if not spec:
        return None, []
    out_dir = Path(out_dir)
    if spec == "latest":
        notes, damaged = [], []
        for _, p in _all_checkpoint_folders(out_dir):
            try:
                verify_checkpoint(p)
            except DamagedCheckpoint as e:
                aside = _quarantine(p)
                damaged.append(f"{p.name} ({e.problem})")
                notes.append(f"{p} is damaged: {e.problem}. Moved aside to {aside.name}; trying the next older one")
                continue
            check_processes(p, num_processes)
            if damaged:
                notes.append(f"resuming from {p.name}, the newest intact checkpoint")
            return p, notes
        if damaged:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: no intact checkpoint in {out_dir}; damaged: {'; '.join(damaged)} "
                "(moved aside as damaged-checkpoint-N). To start over from step 0, use another --output_dir or "
                "drop --resume_from_checkpoint")
        return None, []
    p = Path(spec)
    if not p.is_absolute() and not p.exists():
        p = out_dir / spec
    if not p.exists():
        intact = [c.name for _, c in list_checkpoints(out_dir)]
        raise ResumeMismatch(f"--resume_from_checkpoint {spec}: {p} does not exist (checkpoints in {out_dir}: "
                              f"{', '.join(intact) or 'none'}); use 'latest'")
    try:
        verify_checkpoint(p)
    except DamagedCheckpoint as e:
        raise CheckpointError(
            f"--resume_from_checkpoint {spec}: {p} is not an intact fewstep checkpoint: {e.problem}. Nothing was "
            "loaded. Use --resume_from_checkpoint latest to take the newest intact one, or another checkpoint"
        ) from None
    check_processes(p, num_processes)
    return p, []


def _quarantine(p: Path) -> Path:
    """Rename a damaged checkpoint out of the ``checkpoint-N`` namespace (kept for inspection), so that
    neither ``latest`` nor rotation ever counts it again."""
    for i in range(1000):
        aside = p.with_name(f"damaged-{p.name}" + (f"-{i}" if i else ""))
        if not aside.exists():
            os.replace(p, aside)
            return aside
    raise CheckpointError(f"{p} is damaged and cannot be moved aside")


# ---- fewstep's own state: JSON + safetensors ----------------------------------------------------

def _to_plain(tree: Any, key: str, tensors: dict) -> Any:
    """JSON-able copy of a state dict; tensors are moved to ``tensors`` and replaced by a reference."""
    import torch

    if isinstance(tree, torch.Tensor):
        tensors[key] = tree
        return {"__tensor__": key}
    if isinstance(tree, dict):
        if all(isinstance(k, str) for k in tree):
            return {k: _to_plain(v, f"{key}.{k}", tensors) for k, v in tree.items()}
        return {"__items__": [[k, _to_plain(v, f"{key}.{k}", tensors)] for k, v in tree.items()]}
    if isinstance(tree, (list, tuple)):
        return [_to_plain(v, f"{key}.{i}", tensors) for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (str, bool, int, float)):
        return tree
    raise TypeError(f"checkpoint state {key}: a {type(tree).__name__} can be stored neither as JSON nor as a tensor")


def _from_plain(tree: Any, tensors) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors.get_tensor(tree["__tensor__"])
        if set(tree) == {"__items__"}:
            return {k: _from_plain(v, tensors) for k, v in tree["__items__"]}
        return {k: _from_plain(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_from_plain(v, tensors) for v in tree]
    return tree


def _unshared(tensors: dict) -> dict:
    """safetensors refuses tensors that share memory (tied weights): such duplicates are copied."""
    seen, out = set(), {}
    for k, t in tensors.items():
        t = t.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t
    return out


def write_state(folder: Path, train_state: dict, objects: dict[str, Any], config: dict | None = None) -> None:
    """fewstep's own state into ``folder``: JSON for counters and values, safetensors for tensors."""
    from safetensors.torch import save_file

    tensors: dict = {}
    doc = {"format": FORMAT, "train": _to_plain(train_state, "train", tensors),
           "objects": {name: _to_plain(obj.state_dict(), name, tensors) for name, obj in objects.items()},
           "config": config}
    if tensors:
        save_file(_unshared(tensors), str(Path(folder) / STATE_TENSORS))
    (Path(folder) / STATE_JSON).write_text(json.dumps(doc, indent=1) + "\n")


def read_state_file(folder: Path) -> dict[str, Any]:
    """fewstep's own state of a checkpoint as plain data: ``{"train": ..., "objects": {name: state dict},
    "config": ...}``, tensors loaded (for tools and tests; resuming uses :func:`read_state`)."""
    from contextlib import nullcontext

    from safetensors import safe_open

    folder = Path(folder)
    doc = json.loads((folder / STATE_JSON).read_text())
    ctx = safe_open(str(folder / STATE_TENSORS), framework="pt") if (folder / STATE_TENSORS).is_file() else nullcontext()
    with ctx as tensors:
        return {k: _from_plain(v, tensors) for k, v in doc.items()}


def read_state(folder: Path, train_state, objects: dict[str, Any]) -> None:
    """Restore ``train_state`` and every object of ``objects`` by name from :func:`write_state`'s files, or
    from an old-style checkpoint's ``custom_checkpoint_<i>.pkl`` (weights-only unpickling, by position)."""
    folder = Path(folder)
    if not (folder / STATE_JSON).is_file() and (folder / "custom_checkpoint_0.pkl").is_file():
        return _read_legacy_state(folder, train_state, objects)
    doc = json.loads((folder / STATE_JSON).read_text())
    have = doc.get("objects", {})
    missing = [n for n in objects if n not in have]
    if missing:  # an object a newer fewstep added: it starts fresh, the others still resume by name
        log.warning("%s holds no state for %s (it has: %s): %s from its initial state", folder, ", ".join(missing),
                    ", ".join(have) or "none", "they start" if len(missing) > 1 else "it starts")
    from contextlib import nullcontext

    from safetensors import safe_open

    ctx = safe_open(str(folder / STATE_TENSORS), framework="pt") if (folder / STATE_TENSORS).is_file() else nullcontext()
    with ctx as tensors:
        train_state.load_state_dict(_from_plain(doc["train"], tensors))
        for name, obj in objects.items():
            if name in have:
                obj.load_state_dict(_from_plain(have[name], tensors))
    extra = [n for n in have if n not in objects]
    if extra:
        log.warning("%s holds state for %s, which this run does not use", folder, ", ".join(extra))


def _read_legacy_state(folder: Path, train_state, objects: dict[str, Any]) -> None:
    import torch

    log.warning("%s was written by an older fewstep (no manifest): its files cannot be checked against "
                "checksums; its state is read with torch's weights-only loader", folder)
    targets = [train_state, *objects.values()]
    for i, obj in enumerate(targets):
        p = folder / f"custom_checkpoint_{i}.pkl"
        if not p.is_file():
            raise CheckpointError(f"--resume_from_checkpoint {folder}: {p.name} is missing")
        try:
            obj.load_state_dict(torch.load(p, map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"--resume_from_checkpoint {folder}: {p.name} holds objects other than tensors and plain values, "
                f"which fewstep never writes; refused without running it ({str(e).splitlines()[0][:200]})") from None


def load_checkpoint(accelerator, folder: Path, train_state, objects: dict[str, Any]) -> None:
    """Load a verified checkpoint into the prepared models, optimizers, schedulers, RNG states (accelerate,
    weights-only) and into fewstep's own state. Errors become messages naming the checkpoint."""
    folder = Path(folder)
    from accelerate.utils import load as weights_only_load

    # accelerate reads the RNG states inside a try that only logs a failure (a run that quietly stops
    # being exact): read this rank's file first, with the same weights-only loader, and stop if it fails.
    rng = folder / f"random_states_{accelerator.process_index}.pkl"
    try:
        weights_only_load(rng)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"--resume_from_checkpoint {folder}: {rng.name} holds objects other than tensors and plain values (a "
            f"tampered file?); refused without running it: {str(e).splitlines()[0][:200]}") from None
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"--resume_from_checkpoint {folder}: the RNG states {rng.name} cannot be read "
                              f"({type(e).__name__}: {str(e)[:200]}); an exact resume needs them") from None
    try:
        try:
            accelerator.load_state(str(folder))
        except RuntimeError as e:
            # An old-style folder holds accelerate's custom_checkpoint_<i>.pkl, which this run no longer
            # registers: accelerate checks their number last, after every model, optimizer, scheduler and
            # RNG state is loaded, and asks to load them manually, which read_state does (weights-only).
            if (folder / STATE_JSON).is_file() or "Number of custom checkpoints" not in str(e):
                raise
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"--resume_from_checkpoint {folder}: a file holds objects other than tensors and plain values (a "
            f"checkpoint fewstep did not write, or a tampered one); refused without running it: "
            f"{str(e).splitlines()[0][:200]}") from None
    except (RuntimeError, KeyError, ValueError, OSError) as e:  # shapes or keys of another configuration
        first = " ".join(str(e).split())[:300] or type(e).__name__  # "hundreds of missing keys" cut short
        raise ResumeMismatch(
            f"--resume_from_checkpoint {folder}: this run's models or optimizers cannot load it ({first}). "
            "Was it written with other settings? Resume with the run's settings (see "
            f"{folder.parent / 'fewstep_config.yaml'}), or start a new run with another --output_dir") from e
    read_state(folder, train_state, objects)


# ---- saving -------------------------------------------------------------------------------------

def agree(accelerator, ok: bool) -> bool:
    """True when every rank's ``ok`` is True (one all-reduce; also the barrier of that point)."""
    n = getattr(accelerator, "num_processes", 1)
    if n <= 1:
        accelerator.wait_for_everyone()
        return ok
    import torch

    flag = torch.tensor([0.0 if ok else 1.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum").item()) == 0.0


_FULL_PATTERNS = ("no space left on device", "os error 28", "code: 28", "storagefull", "disk quota exceeded")
# What torch's and safetensors' writers say when a write fails without naming the cause: a full disk is
# the likely one when the free space is below what the save needs (then :func:`is_disk_full` says so).
_WRITE_FAILED = ("inline_container.cc", "iostream error", "file write failed", "pytorchstreamwriter")


def is_disk_full(exc: BaseException, free_bytes: int | None = None, need_bytes: int | None = None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a full disk: ENOSPC / EDQUOT, the text of
    the real errors (``SafetensorError ... os error 28``, ``shutil.Error`` lists), or torch's
    ``[enforce fail at inline_container.cc]`` / ``iostream error`` with less free space than needed."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e).lower()
        if any(p in text for p in _FULL_PATTERNS):
            return True
        if any(p in text for p in _WRITE_FAILED) and free_bytes is not None and need_bytes is not None \
                and free_bytes < max(need_bytes, 1 << 20):
            return True
        e = e.__cause__ or e.__context__
    return False


def free_bytes(path: Path) -> int:
    """Free space where ``path`` is (for root, including the blocks reserved for root)."""
    p = Path(path).resolve()
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return (st.f_bfree if os.geteuid() == 0 else st.f_bavail) * st.f_frsize


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else 0


def checkpoint_bytes(out_dir: Path, accelerator=None, objects: dict | None = None) -> int:
    """What one checkpoint takes: the newest one's manifest, else the size of the state in memory."""
    for _, p in reversed(list_checkpoints(out_dir)):
        try:
            m = read_manifest(p)
        except CheckpointError:
            continue
        if m:
            return sum(f["size"] for f in m["files"].values())
    total = 0

    def tensors(tree):
        import torch

        if isinstance(tree, torch.Tensor):
            yield tree
        elif isinstance(tree, dict):
            for v in tree.values():
                yield from tensors(v)
        elif isinstance(tree, (list, tuple)):
            for v in tree:
                yield from tensors(v)

    for m in getattr(accelerator, "_models", []):
        total += sum(t.numel() * t.element_size() for t in tensors(m.state_dict()))
    for o in getattr(accelerator, "_optimizers", []):
        total += sum(t.numel() * t.element_size() for t in tensors(o.state_dict()))
    for o in (objects or {}).values():
        total += sum(t.numel() * t.element_size() for t in tensors(o.state_dict()))
    return total


def mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def write_manifest(folder: Path, step: int, info: dict | None = None) -> dict:
    """Every file of ``folder`` with its size and SHA-256, into ``fewstep_complete`` (written last)."""
    folder = Path(folder)
    rels = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)
    digests = _hash_all([folder / r for r in rels])
    manifest = {"format": FORMAT, "step": step, **(info or {}),
                "files": {r: {"size": (folder / r).stat().st_size, "sha256": d} for r, d in zip(rels, digests)}}
    (folder / COMPLETE).write_text(json.dumps({**manifest, "manifest_sha256": _digest(manifest)}, indent=1) + "\n")
    return manifest


def run_info(ckpt: Path) -> dict:
    """``{"run_id", "train_seconds"}`` of the run that wrote ``ckpt`` ({} for checkpoints of fewstep
    versions without them)."""
    import json

    p = Path(ckpt) / RUN_FILE
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        return {}


def run_id_of(ckpt: Path) -> str:
    """The id of the run that wrote ``ckpt`` ("" for checkpoints of fewstep versions without ids)."""
    return str(run_info(ckpt).get("run_id", ""))


def previous_run(out_dir: Path) -> str | None:
    """What another run left in ``out_dir`` that a new run would clobber: its checkpoints (complete or not)
    and its exported student. None when there is nothing of the kind."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    what = [p.name for _, p in list_checkpoints(out_dir)]
    what += [p.name for p in sorted(out_dir.glob(".tmp-checkpoint-*"))]
    exported = [n for n in EXPORT_MARKERS if (out_dir / n).exists()]
    if exported:
        what.append("an exported student (" + ", ".join(exported) + ")")
    return ", ".join(what) or None


# Files every fewstep export writes (the pipeline index, or the LoRA weights; the sampling hints of the card).
EXPORT_MARKERS = ("model_index.json", "pytorch_lora_weights.safetensors", "fewstep_sampling.json")


def clear_previous_run(out_dir: Path) -> list[str]:
    """``--overwrite_output_dir``: delete the previous run's checkpoints and exported student (the folders its
    model_index.json names, the LoRA files, the card, the sampling hints and resolved config), so that
    neither a later ``latest`` resume nor a loader can pick up the old run. Other files stay."""
    import json

    out_dir = Path(out_dir)
    gone = []
    victims = [p for _, p in list_checkpoints(out_dir)]
    victims += [p for pre in (".tmp-", ".old-", ".trash-") for p in out_dir.glob(pre + "checkpoint-*")]
    index = out_dir / "model_index.json"
    if index.is_file():
        try:
            parts = [k for k in json.loads(index.read_text()) if not k.startswith("_")]
        except (ValueError, AttributeError):
            parts = []
        victims += [out_dir / k for k in parts if (out_dir / k).is_dir()]
    victims += [out_dir / "scheduler"] + list(out_dir.glob("pytorch_lora_weights*.safetensors"))
    victims += [out_dir / n for n in ("model_index.json", "fewstep_sampling.json", "fewstep_lora.json",
                                      "fewstep_config.yaml")]
    card = out_dir / "README.md"
    if card.is_file() and "fewstep" in card.read_text(errors="replace")[:400]:
        victims.append(card)
    for p in victims:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
        elif p.exists():
            p.unlink()
            gone.append(p.name)
    return gone


def save_checkpoint(accelerator, out_dir: Path, step: int, total_limit: int | None, write_extra=None,
                    info: dict | None = None, need_bytes=None, run: dict | None = None) -> Path:
    """Save to ``.tmp-checkpoint-<step>`` (accelerate's state on every rank, then ``write_extra(tmp)`` on
    the main process), write the manifest, rename, rotate older checkpoints of the same run
    (``run["run_id"]``, written with the rest of ``run`` to :data:`RUN_FILE`; None: every complete
    checkpoint in the folder counts). Every rank learns whether every other one succeeded (one all-reduce
    per phase), so a failure on one rank never leaves the others waiting in a barrier. A full disk removes
    the temporary folder and raises :class:`CheckpointError` with the free space and the space a
    checkpoint needs."""
    run_id = None if run is None else str(run["run_id"])
    out_dir = Path(out_dir)
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".tmp-checkpoint-{step}"
    main = accelerator.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    error: BaseException | None = None
    try:
        accelerator.save_state(str(tmp))
        if main:
            fault_point("save_state", step)
            if write_extra is not None:
                write_extra(tmp)
    except Exception as e:  # noqa: BLE001 - reported after every rank has agreed
        error = e
    if agree(accelerator, error is None) and main:
        try:
            fault_point("before_marker", step)
            if run is not None:
                (tmp / RUN_FILE).write_text(json.dumps(run) + "\n")
            write_manifest(tmp, step, info)
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
        except Exception as e:  # noqa: BLE001
            error = e
        else:
            try:  # the new checkpoint is complete: a failure to delete old ones only warrants a warning
                rotate(out_dir, total_limit, step, run_id)
            except OSError as e:
                log.warning("checkpoint rotation in %s failed (%s); older checkpoints were kept", out_dir, e)
    if agree(accelerator, error is None):
        return final
    if not main:
        raise CheckpointError(f"saving checkpoint-{step} failed on another process (see the main process's message)")
    need = need_bytes() if callable(need_bytes) else (need_bytes or checkpoint_bytes(out_dir, accelerator))
    full = error is not None and is_disk_full(error, free_bytes(out_dir), need)
    shutil.rmtree(tmp, ignore_errors=True)
    if error is None:
        raise CheckpointError(f"saving checkpoint-{step} failed on another process; {tmp} removed")
    prev = list_checkpoints(out_dir)
    intact = f"the previous checkpoint {prev[-1][1]} is intact" if prev else "no earlier checkpoint exists"
    cap = intact[0].upper() + intact[1:]
    if full:
        raise CheckpointError(
            f"disk full while saving checkpoint-{step}: the partial {tmp} was removed; {mb(free_bytes(out_dir))} "
            f"free on the file system of {out_dir}, a checkpoint needs about {mb(need)}. {cap}. Free space, "
            "lower --checkpoints_total_limit or choose another --output_dir, then resume with "
            "--resume_from_checkpoint latest") from None
    raise CheckpointError(f"saving checkpoint-{step} failed ({type(error).__name__}: {str(error)[:300]}); the "
                          f"partial {tmp} was removed; {intact}") from error


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


def rotate(out_dir: Path, total_limit: int | None, step: int = -1, run_id: str | None = None) -> None:
    """Keep the newest ``total_limit`` complete checkpoints of run ``run_id`` (None: of any run); drop stale
    temporary folders. An old checkpoint is first renamed out of the ``checkpoint-N`` namespace, so a
    kill in the middle of deleting it can never leave a half-deleted folder that still looks complete.
    Checkpoints of another run are never touched: highest step numbers are not "newest" across runs."""
    for p in out_dir.glob(".tmp-checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    if not total_limit:
        return
    ckpts = [(s, p) for s, p in list_checkpoints(out_dir) if run_id is None or run_id_of(p) == run_id]
    for _, p in ckpts[: max(0, len(ckpts) - total_limit)]:
        trash = out_dir / (".trash-" + p.name)
        os.replace(p, trash)
        fault_point("during_rotate", step)
        shutil.rmtree(trash, ignore_errors=True)
