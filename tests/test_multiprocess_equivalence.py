"""`accelerate launch --multi_gpu --num_processes 2` on the CPU (two gloo ranks, per-device batch 2) equals
one process at the same global batch (4), for a method whose loss is deterministic per sample.

What must match, and is tested: the samples of every global batch (the ranks split it without overlap
or loss), the global-batch loss at every step, the weights after training, and the run's outputs (one
checkpoint with both ranks' RNG states, one log folder, one export). Tolerance: the two runs differ only
in float summation order (DDP all-reduces two per-rank means of 2 samples and halves the sum; one
process takes one mean of 4), i.e. a few fp32 roundings (~1e-7 relative) per step, which Adam's
normalised updates do not amplify at these sizes: losses within 1e-5 relative, weights within 1e-5.

What does not match by design, and is not compared: the distillation methods' noise. Each rank draws
from its own stream (set_seed(device_specific=True)), so N ranks see other noise than one process;
their losses agree only in distribution."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port
from fewstep.cli import main
from fewstep.methods import REGISTRY

HERE = Path(__file__).resolve().parent


def probe_args(data, out, batch, **kw):
    base = dict(method="probe", train_data_dir=data, output_dir=out, resolution=16, center_crop=True,
                train_batch_size=batch, max_train_steps=4, learning_rate=1e-2, lr_warmup_steps=0,
                validation_steps=0, checkpointing_steps=4, report_to="tensorboard", seed=0)
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def test_two_ranks_equal_one_process_at_the_same_global_batch(caption_folder, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from probe_method import Probe

    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--main_process_port", str(free_port()), str(HERE / "probe_method.py"), "distill", *probe_args(caption_folder, two, 2)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    monkeypatch.setitem(REGISTRY, "probe", Probe)
    one = tmp_path / "one"
    assert main(["distill", *probe_args(caption_folder, one, 4)]) == 0

    h1 = json.loads((one / "probe_history.json").read_text())
    h2 = json.loads((two / "probe_history.json").read_text())
    assert [h["step"] for h in h1] == [h["step"] for h in h2] == [0, 1, 2, 3]
    for a, b in zip(h1, h2):
        assert a["captions"] == b["captions"] and len(a["captions"]) == 4  # the same global batch
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    every = sorted(t.read_text().strip() for t in Path(caption_folder).glob("*.txt"))
    assert sorted(c for h in h1[:3] for c in h["captions"]) == every  # three batches: the 12 samples once each
    w1, w2 = load_file(str(one / "probe.safetensors")), load_file(str(two / "probe.safetensors"))
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5, rtol=0) for k in w1)

    # One checkpoint (both ranks' RNG), one log folder, one export.
    assert sorted(p.name for p in two.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (two / "checkpoint-4" / "random_states_0.pkl").is_file()
    assert (two / "checkpoint-4" / "random_states_1.pkl").is_file()
    assert len(list((two / "logs").iterdir())) == 1
    assert r.stdout.count("student saved") == 1
