"""A full disk, for real (issue 16, item 8): small tmpfs mounts that fill up while torch, safetensors or
the export write; the run ends with a message naming the removed temporary folder, the free space and
what a checkpoint needs, and the same command resumes once there is room. Skipped (with the reason)
where this process may not mount a tmpfs."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_args
from fewstep.cli import main
from fewstep.training import checkpoint as ck


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size) → a fresh tmpfs folder of that many bytes; remount(size) grows it."""
    mounted = []

    def mount(size: int) -> Path:
        d = tmp_path / f"tmpfs{len(mounted)}"
        d.mkdir()
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    def remount(d: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size // 1024}k", str(d)], check=True)

    mount.remount = remount
    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def _errors_on_a_full_disk(d: Path) -> dict[str, BaseException]:
    from safetensors.torch import save_file

    big = torch.zeros(2_000_000)  # 8 MB on a 1 MB file system
    caught = {}
    for name, write in [("torch.save", lambda: torch.save({"w": big}, d / "a.bin")),
                        ("safetensors", lambda: save_file({"w": big}, str(d / "b.safetensors"))),
                        ("open.write", lambda: (d / "c").write_bytes(b"x" * 8_000_000)),
                        ("copytree", lambda: shutil.copytree(SRC_DIR, d / "copy"))]:
        try:
            write()
        except BaseException as e:  # noqa: BLE001
            caught[name] = e
    return caught


SRC_DIR = Path(__file__).resolve().parents[1] / "src" / "fewstep" / "assets" / "teacher_mnist"


def test_the_real_errors_of_a_full_disk_are_recognised(tmpfs):
    d = tmpfs(1 << 20)
    caught = _errors_on_a_full_disk(d)
    assert set(caught) == {"torch.save", "safetensors", "open.write", "copytree"}, caught
    assert "inline_container.cc" in str(caught["torch.save"]) or "iostream error" in str(caught["torch.save"])
    assert "os error 28" in str(caught["safetensors"])
    free = ck.free_bytes(d)
    for name, e in caught.items():
        assert ck.is_disk_full(e, free, 8_000_000), (name, e)
    # torch's message does not say why: with room to spare it is not taken for a full disk
    assert not ck.is_disk_full(caught["torch.save"], 10 << 30, 8_000_000)
    assert not ck.is_disk_full(RuntimeError("size mismatch for conv_in.weight"), 0, 8_000_000)
    assert ck.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))


@pytest.fixture(scope="module")
def straight(tiny_teacher, caption_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "o"
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=4, checkpointing_steps=2)]) == 0
    return out


def _same_student(a: Path, b: Path) -> bool:
    x, y = (load_file(str(p / "unet" / "diffusion_pytorch_model.safetensors")) for p in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _du(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def _sizes(straight: Path) -> dict[str, int]:
    c = straight / "checkpoint-2"
    return {"ckpt": _du(c), "model": (c / "model.safetensors").stat().st_size,
            "optimizer": (c / "optimizer.bin").stat().st_size,
            "export": sum(_du(straight / n) for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))}


MB = 1 << 20


@pytest.mark.parametrize("writer", ["torch.save", pytest.param("safetensors", marks=pytest.mark.slow)])
def test_disk_full_during_a_checkpoint_then_resume(writer, straight, tiny_teacher, caption_folder, tmpfs, capsys):
    """checkpoint-2 fits, checkpoint-4 does not: its optimizer.bin (torch.save) or its model.safetensors
    (safetensors) hits the end of the file system."""
    s = _sizes(straight)
    room = s["ckpt"] + (s["model"] + s["optimizer"] // 2 if writer == "torch.save" else s["model"] // 2)
    fs = tmpfs(room + MB // 2)
    out = fs / "o"
    args = ["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=4, checkpointing_steps=2,
                                 resume_from_checkpoint="latest")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"disk full while saving checkpoint-4: the partial {out / '.tmp-checkpoint-4'} was removed" in err
    assert "free on the file system of" in err and f"a checkpoint needs about {s['ckpt'] / MB:.1f} MB" in err
    assert f"The previous checkpoint {out / 'checkpoint-2'} is intact" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    ck.verify_checkpoint(out / "checkpoint-2")
    tmpfs.remount(fs, 64 * MB)  # the user frees space
    assert main(args) == 0
    assert _same_student(straight, out)  # and the result is the uninterrupted run's


def test_disk_full_during_the_export_leaves_no_half_student(straight, tiny_teacher, caption_folder, tmpfs, capsys):
    """Both checkpoints fit, the student does not: before, `unet/` stayed behind with only its config."""
    s = _sizes(straight)
    fs = tmpfs(2 * s["ckpt"] + s["export"] // 2)
    out = fs / "o"
    args = ["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=4, checkpointing_steps=2,
                                 resume_from_checkpoint="latest")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"disk full while writing the student to {out / '.tmp-export'} (removed; {out} is as before)" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "fewstep_config.yaml"]
    tmpfs.remount(fs, 64 * MB)
    assert main(args) == 0  # resumes at step 4: exports only
    assert "student saved" in capsys.readouterr().out and _same_student(straight, out)
