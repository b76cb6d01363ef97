"""Two real processes (torchrun, gloo on the CPU): DDP training, one checkpoint with every rank's RNG
state, one export, and resume."""

import subprocess
import sys
from pathlib import Path

from conftest import run_args


def _torchrun(args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fewstep", "distill", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_two_processes_train_checkpoint_and_resume(tiny_teacher, caption_folder, tmp_path):
    out = tmp_path / "ddp"
    r = _torchrun(run_args(tiny_teacher, caption_folder, out, max_train_steps=2, checkpointing_steps=2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("student saved") == 1  # only the main process exports
    ckpt = out / "checkpoint-2"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    r = _torchrun(run_args(tiny_teacher, caption_folder, out, max_train_steps=3, checkpointing_steps=1,
                           resume_from_checkpoint="latest"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and Path(out / "checkpoint-3" / "fewstep_complete").is_file()
