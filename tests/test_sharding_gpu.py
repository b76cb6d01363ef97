"""The shipped sharding configs on CUDA GPUs, in bf16: ``accelerate launch --config_file
configs/accelerate/{fsdp,deepspeed_zero2,deepspeed_zero3}.yaml --num_processes N`` (N = min(2, GPUs)) of a tiny
lcm run against the same run in one plain process at the same global batch.

Each run must finish; its per-step losses agree with the plain run's, its exported UNet moved away from the
teacher, is finite, loads in diffusers' StableDiffusionPipeline and holds what the file holds; its checkpoint
is the launcher's kind (FSDP: DCP shards of every rank; DeepSpeed: the engine's partitions of every rank),
and ``fewstep export --from_checkpoint`` of that checkpoint writes the run's export byte for byte.

Tolerances (bf16 runs of a randomly initialised 32-px UNet, lr 1e-3). Step 0 is one forward of identical
weights: the losses agree to rounding (0.5 %). Later steps: under FSDP the forward casts fp32 weights to
bf16 and reduces gradients in fp32, as the plain run's autocast does: 2 % per step (measured on CPU
processes: 0.3 %). DeepSpeed's bf16 engine keeps the trained weights and their gradients in bf16 itself
(the fp32 master copy lives in its optimizer): the first Adam steps, ≈ lr·sign(g), flip on gradients
that bf16 rounds across zero; measured on CPU processes 2.1 % at step 1 and 0.6-1 % at step 2, so 5 %
there (the shipped ZeRO-3 config: see its test). A wrong shard, a missed update or ranks drawing the same
noise move a loss by far more, and the exported weights by more than the 2 % of their norm allowed
(measured 0.2-0.8 %).

Run on a GPU machine (about 4-5 minutes on one GPU): ``python -m pytest -m gpu tests/test_sharding_gpu.py``.
The DeepSpeed cases need deepspeed (``pip install 'fewstep[deepspeed]'``); each case is skipped with the
reason where something is missing. The CPU-process versions of these comparisons, at fp32 and 1e-5, are
tests/test_sharding_multiprocess.py and tests/test_deepspeed.py.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_args
from test_deepspeed import zero3_config
from test_sharding_multiprocess import assert_close, losses, student

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parent / "configs" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
GPUS = torch.cuda.device_count()
N = min(2, GPUS)
UNET = "unet/diffusion_pytorch_model.safetensors"
STEPS = 3

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPUS == 0, reason="needs a CUDA device (none found)")]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed: pip install 'fewstep[deepspeed]'")


def _args(teacher, data, out, procs: int):
    # per-device batch 2; the plain process accumulates N micro-batches: global batch 2N either way
    return run_args(teacher, data, out, train_batch_size=2, gradient_accumulation_steps=N if procs == 1 else 1,
                    max_train_steps=STEPS, checkpointing_steps=STEPS, rng_streams="batch", learning_rate=1e-3,
                    mixed_precision="bf16")


def _ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-5000:])


def launched(config: Path, args):
    """tests/shard_driver.py (fewstep distill + the per-step losses) under accelerate launch on N GPUs."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(N),
           "--main_process_port", str(free_port()), str(HERE / "shard_driver.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=ENV)


@pytest.fixture(scope="module")
def plain(tiny_teacher, caption_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain")
    _ok(subprocess.run([sys.executable, str(HERE / "shard_driver.py"), *_args(tiny_teacher, caption_folder, out, 1)],
                       capture_output=True, text=True, timeout=600, env=ENV))
    return out


def check_against_plain(run: Path, plain: Path, teacher: Path, later_steps_rel: float, first_rel=5e-3) -> None:
    ref, got = losses(plain), losses(run)
    assert list(ref) == [str(i) for i in range(STEPS)] and got.keys() == ref.keys()
    assert got["0"] == pytest.approx(ref["0"], rel=first_rel), (got, ref)
    for k in list(ref)[1:]:
        assert got[k] == pytest.approx(ref[k], rel=later_steps_rel), (k, got, ref)
    from safetensors.torch import load_file

    exported = student(run)
    assert all(bool(torch.isfinite(v).all()) for v in exported.values())
    start = load_file(str(Path(teacher) / UNET))
    assert [k for k, v in exported.items() if k in start and not torch.equal(v, start[k])]  # it trained
    assert_close(student(plain), exported, rel=2e-2, per_tensor=1.0)


def loads_in_diffusers(run: Path) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(str(run), safety_checker=None)
    saved = load_file(str(run / UNET))
    sd = pipe.unet.state_dict()
    assert sd.keys() == saved.keys()
    for k, v in sd.items():
        assert torch.equal(v, saved[k]), k


def export_equals_run(ckpt: Path, run: Path, tmp: Path) -> None:
    out = tmp / "from-checkpoint"
    _ok(subprocess.run([sys.executable, "-m", "fewstep", "export", "--from_checkpoint", str(ckpt), "--output_dir",
                        str(out)], capture_output=True, text=True, timeout=600, env=ENV))
    assert (out / UNET).read_bytes() == (run / UNET).read_bytes()


def manifest(ckpt: Path) -> set[str]:
    return set(json.loads((ckpt / "fewstep_complete").read_text())["files"])


def test_fsdp_config_on_gpus_bf16(plain, tiny_teacher, caption_folder, tmp_path):
    """configs/accelerate/fsdp.yaml (fewstep's --fsdp, FSDP2 on N GPUs, bf16) = the plain run, within bf16."""
    run = tmp_path / "fsdp"
    _ok(launched(CONFIGS / "fsdp.yaml", _args(tiny_teacher, caption_folder, run, N)))
    check_against_plain(run, plain, tiny_teacher, later_steps_rel=2e-2)
    ckpt = run / f"checkpoint-{STEPS}"
    assert {"sharded/.metadata", *(f"sharded/__{r}_0.distcp" for r in range(N))} <= manifest(ckpt)
    loads_in_diffusers(run)
    export_equals_run(ckpt, run, tmp_path)


@needs_deepspeed
@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml", "zero3-partitioned"])
def test_deepspeed_configs_on_gpus_bf16(config, plain, tiny_teacher, caption_folder, tmp_path):
    """The shipped DeepSpeed configs (their mixed_precision line is fewstep's --mixed_precision bf16 here), and
    ZeRO-3 with every parameter partitioned (tests/test_deepspeed.py: the shipped config keeps the tiny UNet's
    tensors whole), = the plain run within bf16; the export holds the fp32 master weights, as the
    checkpoint's partitions do."""
    path = zero3_config(tmp_path / "cfg") if config == "zero3-partitioned" else CONFIGS / config
    run = tmp_path / "ds"
    _ok(launched(path, _args(tiny_teacher, caption_folder, run, N)))
    # (the shipped ZeRO-3 config keeps DeepSpeed's linear, which adds the bias in a second bf16 rounding
    # everywhere in the process: on CPU processes step 0 differed by 1.6 %, steps 1-2 by 2.3 % and 5.0 %,
    # the weights by 0.8 % of their norm)
    shipped3 = config == "deepspeed_zero3.yaml"
    check_against_plain(run, plain, tiny_teacher, later_steps_rel=1e-1 if shipped3 else 5e-2,
                        first_rel=5e-2 if shipped3 else 5e-3)
    ckpt = run / f"checkpoint-{STEPS}"
    # every rank's partition of the optimizer state (bf16_...: DeepSpeed's bf16 optimizer wrote it)
    assert {f"pytorch_model/bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(N)} <= manifest(ckpt)
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(str(run / UNET)).values()} == {torch.float32}
    loads_in_diffusers(run)
    export_equals_run(ckpt, run, tmp_path)
