"""Two real processes (torchrun, gloo on the CPU): DDP training, one checkpoint with every rank's RNG
state, one export, and resume."""

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, run_args


def _torchrun(args, timeout=300):
    # --standalone: a free port for the rendezvous (conftest.free_port says why)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fewstep",
           "distill", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# Slow tier: inside the whole default suite this launch has hung at its very end (the export written and
# "student saved" printed, one rank gone, the other never returning) — 1 of 3 suite runs here, 1 of 52
# launches alone under CPU load. Causes found: two jobs on the default rendezvous port (fixed:
# conftest.free_port), and a gloo teardown deadlock (fixed from its captured stack: Trainer.release).
# Too rare to show the fix by repetition here (docs/RELIABILITY.md).
@pytest.mark.slow
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


def _accelerate(cmd, args, timeout=300):
    # On a CPU-only machine `accelerate launch --cpu` starts ONE process; --multi_gpu starts the
    # requested number, and fewstep's Accelerator(cpu=True) joins them in a gloo group.
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--main_process_port", str(free_port()), "-m", "fewstep", cmd, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_accelerate_two_processes_split_stream_data(tiny_teacher, tmp_path):
    """Two ranks under accelerate launch: the cache they write together holds every shard sample
    exactly once (disjoint rank splits, written in parallel); training on the shards has both ranks'
    stream positions in one checkpoint, one log folder and one export."""
    import json

    from safetensors import safe_open

    from test_data_streams import _png, write_shard

    for s in range(4):
        write_shard(tmp_path / f"{s}.tar", [(f"k{s}{i}", {"png": _png(seed=10 * s + i),
                                                           "txt": f"a photo of a cat s{s}{i}".encode()}) for i in range(3)])
    shards = str(tmp_path / "{0..3}.tar")
    r = _accelerate("cache", ["--pretrained_teacher_model", str(tiny_teacher), "--train_shards_path_or_url", shards,
                              "--resolution", "32", "--train_batch_size", "2", "--output_dir", str(tmp_path / "c")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("cache written") == 1
    index = json.loads((tmp_path / "c" / "cache.json").read_text())
    caps = {p["file"]: json.loads(safe_open(str(tmp_path / "c" / p["file"]), "pt").metadata()["captions"])
            for p in index["parts"]}
    assert {f[:9] for f in caps} == {"part-r000", "part-r001"}  # both ranks wrote
    every = [c for cs in caps.values() for c in cs]
    assert len(every) == 12 and len(set(every)) == 12

    out = tmp_path / "o"
    args = run_args(tiny_teacher, "-", out, max_train_steps=2, checkpointing_steps=2, report_to="tensorboard")
    i = args.index("--train_data_dir")
    args[i:i + 2] = ["--train_shards_path_or_url", shards]
    r = _accelerate("distill", args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("student saved") == 1
    from fewstep.training.checkpoint import read_state_file

    state = read_state_file(out / "checkpoint-2")["train"]
    assert set(state["stream_pos"]) == {0, 1}  # each rank streamed its own shards
    assert sum(sum(p.values()) for p in state["stream_pos"].values()) == 8  # 2 steps × 2 per rank × 2 ranks
    assert len(list((out / "logs").iterdir())) == 1
