"""Reliability: SIGKILL at every point of a checkpoint save, SIGTERM + resume for every method,
non-finite gradients, CUDA out-of-memory, disk full. See docs/RELIABILITY.md for the table.

A new method joins the exactness and fault tests by adding one line to METHODS."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fewstep.cli import main, parse_run
from fewstep.methods import REGISTRY
from fewstep.training import checkpoint as ck
from fewstep.training.trainer import Trainer

# Per method: the arguments of a tiny 4-step run on top of common_args(). One line per method.
METHODS = {
    "lcm": dict(method="lcm"),
    "lcm-lora": dict(method="lcm", lora_rank=4, lora_alpha=8, learning_rate=1e-3),
    "teacher": dict(method="teacher", teacher_preset="tiny", vae_train_steps=2, center_crop=True,
                    teacher_ema_decay=0.5, train_batch_size=4, learning_rate=1e-3),
    "dmd2": dict(method="dmd2", dfake_gen_update_ratio=1, real_guidance_scale=2.0),
    # the interruption (after step 2) falls on the stage boundary and between two target switches
    "disback": dict(method="disback", dfake_gen_update_ratio=1, degradation_steps=2, degradation_interval=1,
                    interval=1),
}


def common_args(method_key, teacher, data, out, **kw) -> list[str]:
    base = dict(train_data_dir=data, output_dir=out, resolution=32, train_batch_size=2, max_train_steps=4,
                learning_rate=1e-4, lr_warmup_steps=2, lr_scheduler="linear", validation_steps=0,
                checkpointing_steps=2, report_to="none", seed=0)
    base.update(METHODS[method_key])
    if REGISTRY[base["method"]].needs_teacher:
        base["pretrained_teacher_model"] = teacher
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


# ---- comparing checkpoints and exports bit for bit ---------------------------------------------

def _load(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".bin", ".pkl", ".pt"):
        return torch.load(path, weights_only=False)
    return path.read_bytes()


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if hasattr(a, "__array__") and not isinstance(a, (str, bytes)):
        import numpy as np

        return np.array_equal(np.asarray(a), np.asarray(b))
    return a == b


def _files(root: Path, pattern: str, exports_only: bool) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob(pattern) if p.is_file() and "logs" not in p.parts
                  and not (exports_only and p.relative_to(root).parts[0].startswith("checkpoint-")))


def assert_same_folder(a: Path, b: Path, pattern="*", exports_only=False) -> None:
    fa, fb = _files(a, pattern, exports_only), _files(b, pattern, exports_only)
    assert fa == fb and fa
    for rel in fa:
        if rel.name in ("fewstep_config.yaml", "README.md"):  # carry the output folder's own name
            continue
        if rel.name in (ck.COMPLETE, ck.RUN_FILE):  # the manifest (checksums of the files compared here);
            continue  # the run's id and wall-clock (two runs to the same state differ there)
        if rel.name == ck.STATE_JSON:  # fewstep's state: equal but for the recorded config (folder names)
            sa, sb = (ck.read_state_file(x / rel.parent) for x in (a, b))
            assert _equal({**sa, "config": None}, {**sb, "config": None}), f"{rel} differs"
            continue
        assert _equal(_load(a / rel), _load(b / rel)), f"{rel} differs"


# ---- 1. a kill at every point of a save (the protocol, with a stand-in accelerator) ------------

class FileAccelerator:
    """What save_checkpoint needs from accelerate: save_state writes the model and RNG files; fewstep's
    own state follows (``write_extra``), after the ``save_state`` fault point, as in a real save."""

    is_main_process = True

    def __init__(self, payload: bytes):
        self.payload = payload

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        Path(path, "model.safetensors").write_bytes(self.payload)
        Path(path, "random_states_0.pkl").write_bytes(self.payload)


def _state(folder):
    Path(folder, ck.STATE_JSON).write_text(json.dumps({"train": {"step": int(Path(folder, "model.safetensors").read_bytes())}}))


def _save(acc, out, step, limit):
    return ck.save_checkpoint(acc, out, step, limit, write_extra=_state)


def _save_in_child(out, step, limit, fault):
    os.environ[ck.FAULT_ENV] = fault
    _save(FileAccelerator(str(step).encode()), Path(out), step, limit)
    os._exit(0)


POINTS = ["save_state", "before_marker", "before_rename", "between_replace", "before_rotate", "during_rotate"]


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_each_point_of_a_save_leaves_a_complete_latest(point, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    acc = FileAccelerator(b"2")
    _save(acc, out, 2, 1)
    if point == "between_replace":  # only a second save of the same step swaps folders
        _save(FileAccelerator(b"4"), out, 4, None)
    child = mp.get_context("fork").Process(target=_save_in_child, args=(out, 4, 1, f"{point}@4"))
    child.start()
    child.join(30)
    assert child.exitcode == -signal.SIGKILL  # it really died there

    ck.recover(out)
    names = sorted(p.name for p in out.iterdir())
    assert not [n for n in names if n.startswith(".")]  # no temporary, moved-aside or trash folder left
    ckpts = ck.list_checkpoints(out)
    assert ckpts, "the kill lost every checkpoint"
    step, latest = ckpts[-1]
    assert ck.resolve_resume(out, "latest") == (latest, [])  # and it passes its manifest check
    # Complete means every file of the save, with the content of that step.
    assert (latest / "model.safetensors").read_bytes() == str(step).encode()
    assert json.loads((latest / ck.STATE_JSON).read_text()) == {"train": {"step": step}}
    # Before the marker the new save does not count; once marked it does, even before its rename.
    expected = 2 if point in ("save_state", "before_marker") else 4
    assert step == expected
    for s, p in ckpts:  # whatever survived is whole
        assert (p / "model.safetensors").read_bytes() == str(s).encode()


def test_rotation_keeps_the_newest_and_recovery_is_idempotent(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    for s in (1, 2, 3, 4):
        _save(FileAccelerator(str(s).encode()), out, s, 2)
    assert [s for s, _ in ck.list_checkpoints(out)] == [3, 4]
    assert ck.recover(out) == [] and [s for s, _ in ck.list_checkpoints(out)] == [3, 4]
    # A half-deleted old checkpoint whose marker survived is out of the checkpoint-N namespace.
    (out / ".trash-checkpoint-3").mkdir()
    (out / ".trash-checkpoint-3" / ck.COMPLETE).write_text("3")
    assert [s for s, _ in ck.list_checkpoints(out)] == [3, 4]
    ck.recover(out)
    assert not (out / ".trash-checkpoint-3").exists()


def test_disk_full_during_save_names_the_intact_previous_checkpoint(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    _save(FileAccelerator(b"2"), out, 2, 1)

    class FullDisk(FileAccelerator):
        def save_state(self, path):
            os.makedirs(path, exist_ok=True)
            Path(path, "model.safetensors").write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ck.CheckpointError, match="disk full while saving checkpoint-4") as e:
        _save(FullDisk(b"4"), out, 4, 1)
    assert "checkpoint-2 is intact" in str(e.value) and "--resume_from_checkpoint latest" in str(e.value)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]
    assert (out / "checkpoint-2" / "model.safetensors").read_bytes() == b"2"


# ---- 2. the real trainer killed mid-save, then resumed ------------------------------------------

def _run_killed(args, fault):
    """`fewstep distill` in a child process that SIGKILLs itself at ``fault`` (same thread count as
    the tests, so the arithmetic matches the in-process runs bit for bit)."""
    code = ("import sys, torch; torch.set_num_threads(2); from fewstep.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, ck.FAULT_ENV: fault, "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-c", code, "distill", *args], env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def straight_lcm(tiny_teacher, caption_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "lcm"
    assert main(["distill", *common_args("lcm", tiny_teacher, caption_folder, out, checkpoints_total_limit=1)]) == 0
    return out


# ~10 s each on 2 idle cores (a child process plus a resumed run); one in the fast tier
@pytest.mark.parametrize("fault", ["save_state@4", pytest.param("during_rotate@4", marks=pytest.mark.slow),
                                   pytest.param("before_marker@2", marks=pytest.mark.slow)])
def test_sigkill_during_a_real_save_then_resume_equals_straight(fault, straight_lcm, tiny_teacher, caption_folder,
                                                                tmp_path):
    out = tmp_path / "killed"
    args = common_args("lcm", tiny_teacher, caption_folder, out, checkpoints_total_limit=1,
                       resume_from_checkpoint="latest")
    r = _run_killed(args, fault)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert main(["distill", *args]) == 0
    assert_same_folder(straight_lcm / "checkpoint-4", out / "checkpoint-4")
    assert_same_folder(straight_lcm / "unet", out / "unet")
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


# ---- 3. every method: straight == SIGTERM + resume ---------------------------------------------

def _record_steps(monkeypatch):
    seen = []
    real = Trainer.step

    def step(self):
        logs = real(self)
        seen.append((self.state.step, dict(logs)))
        return logs

    monkeypatch.setattr(Trainer, "step", step)
    return seen


@pytest.mark.parametrize("method_key", list(METHODS))  # 3-4 s each on 2 idle cores
def test_straight_equals_sigterm_and_resume(method_key, tiny_teacher, caption_folder, tmp_path, monkeypatch):
    """4 steps straight == SIGTERM during step 3 (checkpoint-3 at the step boundary, clean exit) + the
    same command again: same losses at every step, same checkpoint-4 (weights, optimizer, schedulers,
    EMA, RNG states, data position) and the same export."""
    seen = _record_steps(monkeypatch)
    a = tmp_path / "a"
    assert main(["distill", *common_args(method_key, tiny_teacher, caption_folder, a)]) == 0
    straight, seen[:] = list(seen), []

    cls = REGISTRY[METHODS[method_key]["method"]]
    real_loss = cls.loss

    def preempted(self, phase, batch, step):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # what a cluster scheduler sends before preemption
        return real_loss(self, phase, batch, step)

    b = tmp_path / "b"
    args_b = common_args(method_key, tiny_teacher, caption_folder, b, resume_from_checkpoint="latest")
    monkeypatch.setattr(cls, "loss", preempted)
    assert main(["distill", *args_b]) == 128 + signal.SIGTERM  # stopped after saving: 143, not "finished"
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    monkeypatch.setattr(cls, "loss", real_loss)
    assert main(["distill", *args_b]) == 0

    assert [s for s, _ in seen] == [1, 2, 3, 4]
    assert seen == straight  # every logged loss and norm, exactly
    assert any("loss" in k for k in straight[-1][1])
    assert_same_folder(a / "checkpoint-4", b / "checkpoint-4")
    assert_same_folder(a, b, "*.safetensors", exports_only=True)  # the exported student


# ---- 4. non-finite gradients, out of memory ---------------------------------------------------

def _trainer(teacher, data, out, **kw):
    return Trainer(parse_run(common_args("lcm", teacher, data, out, **kw)))


def test_nonfinite_gradient_skips_the_step_and_is_counted(tiny_teacher, caption_folder, tmp_path, monkeypatch):
    """A finite loss whose gradient is inf (a blow-up inside backward) skips the step like a NaN loss:
    weights and optimizer untouched, counted by cause, and --max_nan_steps stops the run."""
    tr = _trainer(tiny_teacher, caption_folder, tmp_path / "o", max_nan_steps=2, max_grad_norm=0, lr_warmup_steps=0)
    tr.start()
    student = tr.acc.unwrap_model(tr.method.student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    real = tr.method.loss

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    def loss_with_inf_grad(phase, batch, step):
        out = real(phase, batch, step)
        out.loss = InfGrad.apply(out.loss)
        return out

    tr.method.loss = loss_with_inf_grad
    logs = tr.step()
    assert torch.isfinite(torch.tensor(logs["loss"])) and "grad_norm" not in logs
    assert tr.state.nonfinite == {"loss": 0, "grad": 1} and tr.state.nan_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert not tr.opts["student"].optimizer.state  # Adam never stepped
    with pytest.raises(SystemExit, match="2 consecutive steps with a non-finite loss or gradient"):
        tr.step()
    tr.method.loss = real
    logs = tr.step()  # a good step resets the streak and updates the weights
    assert tr.state.nan_steps == 0 and logs["grad_norm"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


def test_nan_loss_skips_the_step_and_is_counted(tiny_teacher, caption_folder, tmp_path):
    """A NaN loss (with gradient accumulation: one bad micro-batch of two) skips the optimizer step;
    backward still runs (DDP needs every rank in its all-reduce), and the cause is the loss."""
    tr = _trainer(tiny_teacher, caption_folder, tmp_path / "o", gradient_accumulation_steps=2, lr_warmup_steps=0)
    tr.start()
    student = tr.acc.unwrap_model(tr.method.student)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    real, calls = tr.method.loss, []

    def nan_first(phase, batch, step):
        out = real(phase, batch, step)
        calls.append(step)
        if len(calls) == 1:
            out.loss = out.loss * float("nan")
        return out

    tr.method.loss = nan_first
    logs = tr.step()
    assert len(calls) == 2 and "grad_norm" not in logs and tr.state.step == 1
    assert tr.state.nonfinite == {"loss": 1, "grad": 0} and tr.state.nan_steps == 1
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    assert not tr.opts["student"].optimizer.state
    logs = tr.step()  # no NaN left in the accumulated gradients: the next step trains
    assert tr.state.nan_steps == 0 and logs["grad_norm"] > 0
    assert any(not torch.equal(v, before[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize("where", ["loss", "sample"])  # a training step, a validation grid
def test_cuda_out_of_memory_ends_with_the_options(where, tiny_teacher, caption_folder, tmp_path, monkeypatch):
    from fewstep.methods.lcm import LCM

    def oom(self, *args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(LCM, where, oom)
    with pytest.raises(SystemExit) as e:
        main(["distill", *common_args("lcm", tiny_teacher, caption_folder, tmp_path / "o", gradient_checkpointing=True,
                                      validation_steps=1)])
    msg = str(e.value.code)
    step = 0 if where == "loss" else 1
    assert msg.startswith(f"out of GPU memory at step {step}: CUDA out of memory. Tried to allocate 2.00 GiB")
    for opt in ("--gradient_checkpointing (already on)", "--use_8bit_adam", "--train_batch_size (now 2)",
                "--gradient_accumulation_steps", "--cast_teacher_unet", "--lora_rank 64"):
        assert opt in msg, opt
    assert "Last complete checkpoint: none" in msg


# ---- 5. accelerate configs: multi-GPU, multi-node, FSDP, DeepSpeed ----------------------------

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


@pytest.mark.parametrize("name,kind,procs", [("multi_gpu", "MULTI_GPU", 8), ("multi_node", "MULTI_GPU", 16),
                                             ("fsdp", "FSDP", 8), ("deepspeed_zero2", "DEEPSPEED", 8)])
def test_accelerate_configs_load_as_launch_reads_them(name, kind, procs):
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert c.distributed_type.value == kind and c.num_processes == procs


def test_fsdp_config_resolves_to_a_plugin_that_wraps_the_unet_blocks(tiny_teacher, monkeypatch):
    """What `accelerate launch --config_file fsdp.yaml` exports to each rank, turned into accelerate's FSDP
    plugin; its auto-wrap classes must exist in a diffusers UNet, or FSDP would shard nothing."""
    from accelerate import FullyShardedDataParallelPlugin
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env
    from diffusers import UNet2DConditionModel

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / "fsdp.yaml"), "-m", "fewstep"])
    out = _validate_launch_command(args)
    env = prepare_multi_gpu_env(out[0] if isinstance(out, tuple) else args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    for k, v in env.items():
        if k.startswith(("FSDP_", "ACCELERATE_USE_FSDP")):
            monkeypatch.setenv(k, v)
    unet = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    present = {type(m).__name__ for m in unet.modules()}
    assert set(env["FSDP_TRANSFORMER_CLS_TO_WRAP"].split(",")) <= present
    if not torch.cuda.is_available():
        # The reason FSDP is not run in the CPU tests (docs/RELIABILITY.md): accelerate's plugin itself
        # refuses CPU-only machines. If a later accelerate lifts this, this line says to update the docs.
        with pytest.raises(RuntimeError, match="no available devices"):
            FullyShardedDataParallelPlugin()
        return
    plugin = FullyShardedDataParallelPlugin()
    assert "FULL_SHARD" in str(plugin.sharding_strategy)
    plugin.set_auto_wrap_policy(unet)
    assert plugin.auto_wrap_policy is not None


def test_fsdp_request_on_cpu_falls_back_with_a_warning(tmp_path, monkeypatch, caplog):
    """accelerate enables FSDP only for GPU-like devices; on CPU the run is plain (or DDP) and says so."""
    from fewstep.training.trainer import build_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    cfg = parse_run(["--pretrained_teacher_model", "t", "--report_to", "none"]).train
    acc = build_accelerator(cfg, tmp_path)
    assert acc.distributed_type.value != "FSDP"
    assert "accelerate runs FSDP only on GPUs" in caplog.text


def test_disk_full_in_a_real_run_exits_1_and_resume_continues(tiny_teacher, caption_folder, tmp_path, monkeypatch,
                                                               capsys, caplog):
    """accelerate's save_state hits ENOSPC at the second checkpoint: the command exits 1 naming the intact
    checkpoint-2, no partial folder stays, and the same command resumes from checkpoint-2."""
    from accelerate import Accelerator

    real = Accelerator.save_state

    def full_at_step_4(self, output_dir=None, **kw):
        if output_dir.endswith("checkpoint-4"):
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir, **kw)

    monkeypatch.setattr(Accelerator, "save_state", full_at_step_4)
    out = tmp_path / "o"
    args = ["distill", *common_args("lcm", tiny_teacher, caption_folder, out, resume_from_checkpoint="latest")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "disk full while saving checkpoint-4" in err and f"{out / 'checkpoint-2'} is intact" in err
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    monkeypatch.setattr(Accelerator, "save_state", real)
    import logging

    caplog.set_level(logging.INFO, logger="fewstep")
    assert main(args) == 0
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in caplog.text
    assert (out / "checkpoint-4" / ck.COMPLETE).is_file()
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
