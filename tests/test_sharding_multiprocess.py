"""FSDP2 on two real gloo processes (torchrun on the CPU) against one process and against DDP, sharded
checkpoints across process counts, SIGKILL and resume, and the bytes each rank holds.

The runs use per-micro-batch random streams (``--rng_streams batch``, the default under --fsdp), so the
noise of a micro-batch does not depend on which process runs it: two processes with per-device batch 2
read and draw exactly what one process with 2 accumulation steps of 2 reads and draws (global batch 4).
The runs then differ only in float summation order (two per-rank means averaged by a reduce-scatter or
all-reduce vs two micro-batch means accumulated), a few fp32 roundings per step: losses within 1e-5
relative, the exported weights within 1e-5 of their norm (each tensor within 1e-4 of its own).

Each launch costs 20-60 s on the 2-core test machine, so every test here is in the slow tier; the
default tier's checks of the same code run one process on a one-rank mesh (tests/test_sharding.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import run_args

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

CASES = {
    "lcm": dict(method="lcm"),
    "lcm-lora": dict(method="lcm", lora_rank=4, ema_decay=0.9),
    "dmd2": dict(method="dmd2", dfake_gen_update_ratio=1, learning_rate=1e-3),
    # both GAN terms (the head on a feature inside the sharded fake score); the pooled head, see
    # tests/test_sharding.py for why not the default one on this 32-px teacher
    "dmd2-gan": dict(method="dmd2", dfake_gen_update_ratio=1, learning_rate=1e-3, gen_cls_loss_weight=0.5,
                     guidance_cls_loss_weight=0.5, gan_head="pooled"),
}


def _args(teacher, data, out, procs: int, fsdp: bool, **kw):
    # per-device batch 2; one process accumulates 2 micro-batches: global batch 4 either way
    base = dict(train_batch_size=2, gradient_accumulation_steps=2 if procs == 1 else 1, max_train_steps=3,
                checkpointing_steps=100, rng_streams="batch", learning_rate=1e-3)
    base.update(kw)
    if fsdp:
        base.update(fsdp="true")
    return run_args(teacher, data, out, **base)


def launch(args, procs: int, timeout=600, driver=True):
    """The driver (or `fewstep distill`) on ``procs`` gloo processes (torchrun) or as one process."""
    target = [str(HERE / "shard_driver.py")] if driver else ["-m", "fewstep", "distill"]
    if procs == 1:
        cmd = [sys.executable, *target, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               *target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def _ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-5000:])


def losses(out: Path) -> dict[str, float]:
    return json.loads((Path(out) / "losses.json").read_text())


def student(out: Path) -> dict[str, torch.Tensor]:
    """The exported trained weights: the UNet, or the LoRA file."""
    from safetensors.torch import load_file

    out = Path(out)
    f = out / "unet" / "diffusion_pytorch_model.safetensors"
    return load_file(str(f if f.is_file() else out / "pytorch_lora_weights.safetensors"))


def assert_close(a: dict, b: dict, rel=1e-5, per_tensor=1e-4):
    """The exported weights as one vector within ``rel`` of its norm (||a - b|| <= rel ||a||), and every
    tensor within ``per_tensor`` of its own norm. (Tensors that start at zero — LoRA's B matrices, the
    guidance embedding's projection — hold nothing but a few Adam steps, where an fp32 summation-order
    difference in a gradient that nearly cancels shows up at ~1e-5 of the tensor; a wrong shard, a
    missed update or a mis-seeded rank moves them by 1e-2 or more.)"""
    assert a.keys() == b.keys()
    num = den = 0.0
    for k in a:
        d, scale = float((a[k].double() - b[k].double()).norm()), float(a[k].double().norm())
        assert d <= per_tensor * max(scale, 1e-12), (k, d, scale)
        num, den = num + d * d, den + scale * scale
    assert num ** 0.5 <= rel * den ** 0.5, (num ** 0.5, den ** 0.5)


def _three_runs_agree(teacher, data, tmp_path, kw, steps=3, per_tensor=1e-4):
    """2 processes under --fsdp, 1 process, 2 DDP processes at the same global batch: the same losses and
    exported weights (float order aside)."""
    runs = {"fsdp2": (2, True), "one": (1, False), "ddp2": (2, False)}
    for name, (procs, fsdp) in runs.items():
        _ok(launch(_args(teacher, data, tmp_path / name, procs, fsdp, **kw), procs))
    ref = losses(tmp_path / "one")
    assert list(ref) == [str(i) for i in range(steps)]
    for name in ("fsdp2", "ddp2"):
        got = losses(tmp_path / name)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-5), (name, k)
        assert_close(student(tmp_path / "one"), student(tmp_path / name), per_tensor=per_tensor)


@pytest.mark.slow  # 3 launches each, 1-2 minutes on 2 shared cores
@pytest.mark.parametrize("case", ["direct", "disback"])
def test_fsdp_two_processes_direct_and_disback(case, tiny_teacher, caption_folder, tmp_path):
    """The two other methods on 2 ranks: direct (the student's K-step sampler unrolled; one process
    checkpoints each step's call, several do not: the same gradient) on teacher rows from `fewstep
    generate`, and DisBack through both stages (3 degradation steps that record the path, whose points
    are gathered from the shards, then backtracking towards them)."""
    if case == "direct":
        from fewstep.generate import generate

        data = tmp_path / "rows"
        generate(str(tiny_teacher), str(data), ["a handwritten digit three", "a photo of a cat"], teacher_steps=4,
                 teacher_guidance_scale=3.0, student_steps=2, student_guidance_scale=1.0, images_per_prompt=2,
                 seed=10, save_latents=True, batch_size=4, progress=False)
        kw, steps = dict(method="direct"), 3
    else:
        data = caption_folder
        # The generator's first AdamW step comes after three fake-score steps whose fp32 rounding differs
        # between sharded and whole networks (~1e-7); some of its gradients are zero up to rounding (a
        # bias in front of a norm that removes it), and AdamW's first step turns such noise into ±lr. A
        # larger epsilon damps that; the tensors where it remains are allowed 1e-3 of their norm (a wrong
        # shard or a missed step moves the whole vector by far more than its 1e-5).
        kw = dict(method="disback", dfake_gen_update_ratio=1, real_guidance_scale=2.0, degradation_steps=3,
                  degradation_interval=1, interval=1, max_train_steps=6, adam_epsilon=1e-6)
        steps = 6
    _three_runs_agree(tiny_teacher, data, tmp_path, kw, steps, per_tensor=1e-4 if case == "direct" else 1e-3)


@pytest.mark.slow  # ~3 launches per case, 1-3 minutes each case on 2 shared cores
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_two_processes_equal_one_process_and_ddp(case, tiny_teacher, caption_folder, tmp_path):
    kw = CASES[case]
    runs = {"fsdp2": (2, True), "one": (1, False), "ddp2": (2, False)}
    for name, (procs, fsdp) in runs.items():
        _ok(launch(_args(tiny_teacher, caption_folder, tmp_path / name, procs, fsdp, **kw), procs))
    ref = losses(tmp_path / "one")
    assert list(ref) == ["0", "1", "2"]
    for name in ("fsdp2", "ddp2"):
        got = losses(tmp_path / name)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], rel=1e-5), (name, k)
        assert_close(student(tmp_path / "one"), student(tmp_path / name))
    # the weights changed (the comparison is not between untouched copies)
    from safetensors.torch import load_file

    if case != "lcm-lora":
        start = load_file(str(Path(tiny_teacher) / "unet" / "diffusion_pytorch_model.safetensors"))
        moved = [k for k, v in student(tmp_path / "fsdp2").items() if k in start and not torch.equal(v, start[k])]
        assert moved


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc: the ranks torchrun started)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(path: Path, proc, log: Path, timeout=600):
    t0 = time.time()
    while not (path / "fewstep_complete").is_file():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() - t0 < timeout
        time.sleep(0.2)


@pytest.mark.slow  # five launches: ~5 minutes on 2 shared cores
def test_fsdp_kill_resume_and_resume_on_other_process_counts(tiny_teacher, caption_folder, tmp_path):
    """Straight 4 steps on 2 processes (checkpoints at 2 and 4) vs: SIGKILL of the whole job after
    checkpoint-2, then resume on 2 (bit-identical export); the 2-process checkpoint-2 resumed on 1 process
    (2 accumulation steps: the same continuation); a 1-process checkpoint-2 resumed on 2 processes."""
    def args(out, procs, **kw):
        return _args(tiny_teacher, caption_folder, out, procs, True, **{"max_train_steps": 4, "checkpointing_steps": 2,
                                                                        **kw})

    straight = tmp_path / "straight"
    _ok(launch(args(straight, 2), 2, driver=False))
    # the sharded checkpoint: one file per rank, all in the manifest
    manifest = json.loads((straight / "checkpoint-2" / "fewstep_complete").read_text())["files"]
    assert {"sharded/__0_0.distcp", "sharded/__1_0.distcp", "sharded/.metadata"} <= set(manifest)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fewstep",
           "distill", *args(killed, 2, max_train_steps=40)]
    log = open(tmp_path / "killed.log", "w")  # (a file, not a pipe: a full pipe would block the ranks)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env=ENV, start_new_session=True)
    try:
        _wait_for(killed / "checkpoint-2", proc, tmp_path / "killed.log")
    finally:
        # the launcher and both ranks (torchrun starts each rank in a session of its own), all at once
        pids = [*descendants(proc.pid), proc.pid]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
        log.close()
    assert len(pids) >= 3  # (the launcher and its two ranks were found)
    time.sleep(1)
    assert not [p for p in pids if _alive(p)]
    assert not (killed / "unet").exists()
    for c in [*killed.glob("checkpoint-*"), *killed.glob(".tmp-checkpoint-*")]:  # as if killed right after 2
        if c.name != "checkpoint-2":
            shutil.rmtree(c)
    _ok(launch(args(killed, 2, resume_from_checkpoint="latest"), 2, driver=False))
    for f in ("unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (straight / f).read_bytes() == (killed / f).read_bytes(), f

    # 2 -> 1 process: the same continuation (float order aside)
    one = tmp_path / "one"
    one.mkdir()
    shutil.copytree(straight / "checkpoint-2", one / "checkpoint-2")
    _ok(launch(args(one, 1, resume_from_checkpoint="latest"), 1, driver=False))
    assert_close(student(straight), student(one))
    # 1 -> 2 processes
    first = tmp_path / "first"
    _ok(launch(args(first, 1, max_train_steps=2), 1, driver=False))
    _ok(launch(args(first, 2, resume_from_checkpoint="latest"), 2, driver=False))
    assert_close(student(straight), student(first))
    # and the resume on another number of processes needs the same global batch
    r = launch(args(tmp_path / "x", 1, gradient_accumulation_steps=1, resume_from_checkpoint=str(straight / "checkpoint-2")),
               1, driver=False)
    assert r.returncode == 2 and "--gradient_accumulation_steps 2" in r.stderr


@pytest.mark.slow  # two launches
def test_bytes_held_per_rank_fsdp_vs_ddp(tiny_teacher, caption_folder, tmp_path):
    """Parameters + optimizer state per rank, measured after training: a sharded trained network holds
    about half of what DDP holds on each of 2 ranks (docs/PERFORMANCE.md records the numbers)."""
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        _ok(launch(_args(tiny_teacher, caption_folder, tmp_path / name, 2, fsdp, max_train_steps=1), 2))
    held = {name: [json.loads((tmp_path / name / f"held_rank{r}.json").read_text())["student"] for r in (0, 1)]
            for name in ("fsdp", "ddp")}
    ddp = held["ddp"][0]
    for rank in held["fsdp"]:
        for key in ("trained_params", "optimizer_state"):
            assert 0.45 <= rank[key] / ddp[key] <= 0.55, (key, rank[key], ddp[key])
    total = sum(r["trained_params"] + r["optimizer_state"] for r in held["fsdp"])
    assert total == pytest.approx(ddp["trained_params"] + ddp["optimizer_state"], rel=0.02)  # (padding aside)
    print(json.dumps(held))


@pytest.mark.slow  # two launches
def test_fsdp_validation_grid_on_two_ranks(tiny_teacher, caption_folder, tmp_path):
    """Validation under --fsdp: every rank runs the sampler (each forward gathers the shards), the main
    process alone writes the grid, and no rank waits for another; the 2-process grid equals the 1-process
    one (the same weights up to fp32 rounding: within one 8-bit level)."""
    import numpy as np
    from PIL import Image

    grids = {}
    for procs in (2, 1):
        out = tmp_path / f"p{procs}"
        _ok(launch(_args(tiny_teacher, caption_folder, out, procs, True, max_train_steps=2, validation_steps=2,
                         validation_prompts="a photo of a cat"), procs))
        (png,) = (out / "validation").glob("step-*.png")
        grids[procs] = np.asarray(Image.open(png)).astype(int)
    assert grids[2].shape == grids[1].shape and grids[1].std() > 0
    assert np.abs(grids[2] - grids[1]).max() <= 1
