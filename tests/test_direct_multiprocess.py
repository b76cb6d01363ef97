"""Two real processes (torchrun, gloo on the CPU): `fewstep generate` split across ranks gives the rows
and pictures of one process; direct distillation under DDP (K denoiser calls before one backward)."""

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import run_args


def _torchrun(*args, timeout=300):
    # --standalone: a free port for the rendezvous (conftest.free_port says why)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fewstep", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~75 s: two torchrun launches
def test_generate_on_two_ranks_then_direct_under_ddp(tiny_teacher, tmp_path):
    from fewstep.generate import generate

    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten digit two\na photo of a cat\n")
    common = ["--teacher", str(tiny_teacher), "--prompts", str(prompts), "--images_per_prompt", "3",
              "--teacher_steps", "3", "--student_steps", "2", "--batch_size", "2"]
    r = _torchrun("generate", "--output_dir", str(tmp_path / "two"), *common)
    assert r.returncode == 0, r.stderr[-3000:]
    generate(str(tiny_teacher), str(tmp_path / "one"), ["a handwritten digit two", "a photo of a cat"],
             images_per_prompt=3, teacher_steps=3, student_steps=2, batch_size=2, progress=False)
    rows = {d: list(csv.DictReader((tmp_path / d / "metadata.csv").open())) for d in ("one", "two")}
    assert rows["one"] == rows["two"] and len(rows["two"]) == 6
    assert not list((tmp_path / "two").glob("metadata.part-*"))
    for row in rows["two"]:  # rank 1 drew rows 1, 3, 5: same noise, same picture
        a, b = (np.asarray(Image.open(tmp_path / d / row["image"])).astype(int) for d in ("one", "two"))
        assert np.abs(a - b).max() <= 1  # other batch compositions round differently, by one level at most

    out = tmp_path / "ddp"
    r = _torchrun("distill", *run_args(tiny_teacher, tmp_path / "two", out, method="direct", max_train_steps=2,
                                       learning_rate=1e-3, checkpointing_steps=2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("student saved") == 1
    assert "per-step checkpointing is off" in r.stderr
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
