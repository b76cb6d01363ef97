"""Nothing silently wrong (issue 16, items 1-4 and 12): a teacher with NaN weights, runs whose every step
was skipped, damaged checkpoints, settings changed on resume, "the last good checkpoint", and state
files that could run code. See docs/RELIABILITY.md for the figures."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.methods import REGISTRY
from fewstep.methods.lcm import LCM
from fewstep.training import checkpoint as ck
from fewstep.training.trainer import Trainer

SRC = Path(__file__).resolve().parents[1] / "src" / "fewstep"


def _nan_loss(real):
    def loss(self, phase, batch, step):
        out = real(self, phase, batch, step)
        out.loss = out.loss * float("nan")
        return out
    return loss


# ---- 1. a NaN teacher, runs where no step succeeded, a non-finite export -------------------------

@pytest.mark.parametrize("part,method", [("unet", "lcm"), ("vae", "lcm"), ("unet", "dmd2")])
def test_nan_in_the_teacher_is_refused_when_it_loads_naming_the_file(part, method, tiny_teacher, caption_folder,
                                                                     tmp_path, capsys):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    f = teacher / part / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    save_file(sd, str(f))
    out = tmp_path / "o"
    assert main(["distill", *run_args(teacher, caption_folder, out, method=method, max_train_steps=8)]) == 2
    err = capsys.readouterr().err
    assert f"read from {f}" in err and "non-finite" in err and key in err
    assert not (out / "unet").exists() and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("method", ["lcm", "dmd2"])
def test_a_run_whose_every_step_was_skipped_exports_nothing(method, tiny_teacher, caption_folder, tmp_path,
                                                            monkeypatch, capsys, caplog):
    """3 steps, all non-finite (fewer than --max_nan_steps): no "student saved", a non-zero exit, no
    student files; the summary says how many steps were skipped and why."""
    cls = REGISTRY[method]
    monkeypatch.setattr(cls, "loss", _nan_loss(cls.loss))
    caplog.set_level(logging.INFO, logger="fewstep")
    out = tmp_path / "o"
    code = main(["distill", *run_args(tiny_teacher, caption_folder, out, method=method, max_train_steps=3,
                                      checkpointing_steps=2)])
    cap = capsys.readouterr()
    assert code == 1 and "student saved" not in cap.out
    assert "none of the 3 optimizer steps succeeded" in cap.err
    assert "3 optimizer steps, 0 succeeded, 3 skipped (non-finite loss: 3)" in caplog.text
    assert not (out / "unet").exists() and not (out / "model_index.json").exists()
    assert not list(out.glob("checkpoint-*"))  # none written during a streak of skipped steps


def test_an_export_holding_a_non_finite_value_is_refused(tiny_teacher, caption_folder, tmp_path, monkeypatch, capsys):
    """Steps succeed, then the student's weights turn NaN (after the last step): the export is checked
    tensor by tensor before it is moved into place."""
    real = LCM.after_step

    def poison(self, phase, step):
        real(self, phase, step)
        if step == 2:
            with torch.no_grad():
                next(self.accelerator.unwrap_model(self.student).parameters()).view(-1)[0] = float("nan")

    monkeypatch.setattr(LCM, "after_step", poison)
    out = tmp_path / "o"
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=2)]) == 1
    err = capsys.readouterr().err
    assert "not exporting: unet/diffusion_pytorch_model.safetensors holds 1 non-finite value(s)" in err
    assert not (out / "unet").exists() and not (out / "model_index.json").exists()
    assert not (out / ".tmp-export").exists() and (out / "checkpoint-2").is_dir()


# ---- 4. checkpoints are never written during a streak; "last good checkpoint" -------------------

def test_no_checkpoint_during_a_streak_and_the_last_good_one_is_named(tiny_teacher, caption_folder, tmp_path,
                                                                       monkeypatch):
    real = LCM.loss

    def bad_from_step_2(self, phase, batch, step):
        out = real(self, phase, batch, step)
        if step >= 2:  # steps 1 and 2 succeed, then a streak (as after a learning rate blow-up)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LCM, "loss", bad_from_step_2)
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=10, checkpointing_steps=1,
                                   max_nan_steps=3)])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert f"Last good checkpoint: {out / 'checkpoint-2'} (written after step 2, the last step that succeeded)" \
        in str(e.value.code)


def test_no_successful_step_means_no_good_checkpoint(tiny_teacher, caption_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(LCM, "loss", _nan_loss(LCM.loss))
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as e:
        main(["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=10, checkpointing_steps=1,
                                   max_nan_steps=2)])
    assert "Last good checkpoint: none (no checkpoint was written after a successful step; no step of this run " \
           "succeeded)" in str(e.value.code)
    assert not list(out.glob("checkpoint-*"))


# ---- 2. damaged checkpoints ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(tiny_teacher, caption_folder, tmp_path_factory):
    """A 4-step LCD run with checkpoint-2 and checkpoint-4, and its export (the reference result)."""
    out = tmp_path_factory.mktemp("ckpts") / "run"
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=4, checkpointing_steps=2,
                                      lr_warmup_steps=2, lr_scheduler="linear")]) == 0
    return out


# (literal names, so that this module also loads against code without them and each test fails alone)
KINDS = ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "fewstep_state.json",
         "fewstep_state.safetensors", "fewstep_complete"]
CORRUPTIONS = [(k, how) for k in KINDS for how in ("truncate", "flip", "delete")] + [("(all)", "empty")]


def corrupt(ckpt: Path, kind: str, how: str) -> None:
    if how == "empty":
        shutil.rmtree(ckpt)
        ckpt.mkdir()
        return
    f = ckpt / kind
    if how == "delete":
        f.unlink()
        return
    data = bytearray(f.read_bytes())
    if how == "truncate":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one byte flipped in the middle
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))


@pytest.mark.parametrize("kind,how", CORRUPTIONS)
def test_each_corruption_falls_back_or_stops_naming_the_file(kind, how, two_checkpoints, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    corrupt(out / "checkpoint-4", kind, how)
    path, notes = ck.resolve_resume(out, "latest")
    assert path == out / "checkpoint-2"  # the newest intact one
    named = "empty" if how == "empty" else kind
    assert named in notes[0] and "checkpoint-4 is damaged" in notes[0]
    assert (out / "damaged-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    # An explicit path to a damaged checkpoint stops, naming the file; nothing is loaded.
    shutil.copytree(two_checkpoints / "checkpoint-4", out / "checkpoint-4")
    corrupt(out / "checkpoint-4", kind, how)
    with pytest.raises(ck.CheckpointError, match=f"is not an intact fewstep checkpoint: .*{named}"):
        ck.resolve_resume(out, str(out / "checkpoint-4"))


def _resume_after(kind, how, two_checkpoints, teacher, data, tmp_path, caplog) -> None:
    """Corrupt checkpoint-4 of a copy of the run, then the same command with `latest`: the run names the
    damage, resumes from checkpoint-2 and ends with the uninterrupted run's student."""
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for p in out.iterdir():
        if not p.name.startswith("checkpoint-"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()  # keep only the checkpoints
    corrupt(out / "checkpoint-4", kind, how)
    caplog.set_level(logging.INFO, logger="fewstep")
    assert main(["distill", *run_args(teacher, data, out, max_train_steps=4, checkpointing_steps=2,
                                      lr_warmup_steps=2, lr_scheduler="linear", resume_from_checkpoint="latest")]) == 0
    assert f"{out / 'checkpoint-4'} is damaged: " in caplog.text
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in caplog.text
    a = load_file(str(two_checkpoints / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_flipped_byte_in_the_newest_checkpoint_resumes_from_the_previous_one_exactly(
        two_checkpoints, tiny_teacher, caption_folder, tmp_path, caplog):
    """Today's silent case: one byte of model.safetensors flipped, then `latest` gave another model with
    exit 0. Now the run says so, resumes from checkpoint-2 and ends with the same student."""
    _resume_after("model.safetensors", "flip", two_checkpoints, tiny_teacher, caption_folder, tmp_path, caplog)
    assert "model.safetensors does not match its SHA-256 checksum" in caplog.text


@pytest.mark.slow  # ~4 s each: the figures of docs/RELIABILITY.md (22 trials, 22 resumed, 22 exact)
@pytest.mark.parametrize("kind,how", CORRUPTIONS)
def test_every_corruption_then_latest_resumes_exactly(kind, how, two_checkpoints, tiny_teacher, caption_folder,
                                                      tmp_path, caplog):
    _resume_after(kind, how, two_checkpoints, tiny_teacher, caption_folder, tmp_path, caplog)


def test_a_missing_rng_file_is_an_error_not_a_quiet_loss_of_exactness(two_checkpoints, tiny_teacher, caption_folder,
                                                                      tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    for c in ("checkpoint-2", "checkpoint-4"):
        (out / c / "random_states_0.pkl").unlink()
    args = run_args(tiny_teacher, caption_folder, out, max_train_steps=4, checkpointing_steps=2,
                    resume_from_checkpoint="latest")
    assert main(["distill", *args]) == 1
    err = capsys.readouterr().err
    assert "no intact checkpoint" in err and "random_states_0.pkl is missing" in err
    assert "Traceback" not in err


# ---- 3. settings changed on resume -------------------------------------------------------------

def test_changed_optimizer_settings_apply_on_resume_and_are_logged(two_checkpoints, tiny_teacher, caption_folder,
                                                                   tmp_path, caplog):
    """The restored optimizer and scheduler carry the old run's learning rate, betas, ε and weight decay;
    the new command line wins, is logged, and is what fewstep_config.yaml records."""
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    caplog.set_level(logging.INFO, logger="fewstep")
    new = dict(learning_rate=1e-3, adam_beta2=0.99, adam_epsilon=1e-6, adam_weight_decay=0.01)
    tr = Trainer(parse_run(run_args(tiny_teacher, caption_folder, out, max_train_steps=4, checkpointing_steps=2,
                                    lr_warmup_steps=2, lr_scheduler="linear", resume_from_checkpoint="checkpoint-2",
                                    **new)))
    tr.start()
    g = tr.opts["student"].optimizer.param_groups[0]
    sched = tr.scheds["student"].scheduler
    assert g["initial_lr"] == 1e-3 and sched.base_lrs == [1e-3]
    # linear warm-up of 2 steps done, linear decay over 4 → at step 2 the factor is (4 - 2) / (4 - 2) = 1
    assert g["lr"] == pytest.approx(1e-3 * sched.lr_lambdas[0](sched.last_epoch)) and sched.last_epoch == 2
    assert g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6 and g["weight_decay"] == 0.01
    assert "learning rate (--learning_rate or the method's own): 0.0001 -> 0.001" in caplog.text
    assert "--adam_epsilon: 1e-08 -> 1e-06" in caplog.text
    import yaml

    rec = yaml.safe_load((out / "fewstep_config.yaml").read_text())
    assert rec["learning_rate"] == 1e-3 and rec["adam_epsilon"] == 1e-6


# ---- 12. nothing in a checkpoint folder can run code ---------------------------------------------

class _Planted:
    """Unpickling this runs os.system: what a checkpoint folder from someone else could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _replant(ckpt: Path, name: str, marker: Path) -> None:
    (ckpt / name).write_bytes(pickle.dumps({"state": _Planted(marker)}))
    m = json.loads((ckpt / ck.COMPLETE).read_text())
    if isinstance(m, dict):  # whoever plants it can rewrite the manifest too (it is not a signature)
        m.pop("manifest_sha256")
        m["files"][name] = {"size": (ckpt / name).stat().st_size, "sha256": ck._sha256(ckpt / name)}
        m["manifest_sha256"] = ck._digest(m)
        (ckpt / ck.COMPLETE).write_text(json.dumps(m))


def test_fewstep_state_is_json_and_safetensors_and_library_pickles_load_weights_only(two_checkpoints):
    c = two_checkpoints / "checkpoint-4"
    assert not list(c.glob("custom_checkpoint_*"))
    state = ck.read_state_file(c)
    assert state["train"]["step"] == 4 and set(state["objects"]) == {"target"}  # by stateful() name
    assert all(isinstance(v, torch.Tensor) for v in state["objects"]["target"].values())
    for f in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):  # accelerate's, read weights-only
        from accelerate.utils import load

        load(c / f)


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "legacy"])
def test_a_planted_pickle_never_runs(name, two_checkpoints, tiny_teacher, caption_folder, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    marker = tmp_path / "PWNED"
    ckpt = out / "checkpoint-4"
    if name == "legacy":  # an old-style folder: marker "4", the state in custom_checkpoint_<i>.pkl
        (ckpt / ck.STATE_JSON).unlink()
        (ckpt / ck.STATE_TENSORS).unlink()
        (ckpt / ck.COMPLETE).write_text("4")
        (ckpt / "custom_checkpoint_1.pkl").write_bytes(b"")
        _replant(ckpt, "custom_checkpoint_0.pkl", marker)
    else:
        _replant(ckpt, name, marker)
    code = main(["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=4, checkpointing_steps=2,
                                      resume_from_checkpoint=str(ckpt))])
    err = capsys.readouterr().err
    assert not marker.exists(), "the planted command ran"
    assert code == 1 and "refused without running it" in err and "Traceback" not in err


def test_no_loader_in_fewstep_unpickles_with_full_pickle():
    """Checkpoints, `fewstep cache` folders and `generate` outputs are read as JSON, CSV, PNG and
    safetensors; a torch.load anywhere must be weights-only."""
    offenders = []
    for f in SRC.rglob("*.py"):
        text = f.read_text()
        for bad in ("weights_only=False", "pickle.load(", "pickle.loads(", "dill.load", "cloudpickle"):
            if bad in text:
                offenders.append(f"{f.relative_to(SRC)}: {bad}")
        for i, line in enumerate(text.splitlines()):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{f.relative_to(SRC)}:{i + 1}: {line.strip()}")
    assert not offenders, offenders


def test_a_checkpoint_written_before_manifests_still_resumes(two_checkpoints, tiny_teacher, caption_folder, tmp_path,
                                                             caplog):
    """Today's format (marker = step, state pickled by accelerate by registration position), rebuilt
    from a real checkpoint: it resumes, read weights-only, and the run says its files were not checked."""
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    c = out / "checkpoint-2"
    state = ck.read_state_file(c)
    train = {k: v for k, v in state["train"].items() if k not in ("good_steps", "last_good_step", "samples_trained",
                                                                  "last_batch")}
    torch.save(train, c / "custom_checkpoint_0.pkl")
    torch.save(state["objects"]["target"], c / "custom_checkpoint_1.pkl")
    for f in (ck.STATE_JSON, ck.STATE_TENSORS):
        (c / f).unlink()
    (c / ck.COMPLETE).write_text("2")
    shutil.rmtree(out / "checkpoint-4")
    caplog.set_level(logging.INFO, logger="fewstep")
    assert main(["distill", *run_args(tiny_teacher, caption_folder, out, max_train_steps=4, checkpointing_steps=2,
                                      lr_warmup_steps=2, lr_scheduler="linear", resume_from_checkpoint="latest")]) == 0
    assert "written by an older fewstep (no manifest)" in caplog.text and "resumed from" in caplog.text
    a = load_file(str(two_checkpoints / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # still exact


# ---- issue 17 item 7: methods own their resume keys, stateful names and memory hints -------------

def test_methods_declare_their_resume_keys_and_the_checkpoint_code_names_none():
    import dataclasses

    text = (SRC / "training" / "checkpoint.py").read_text() + (SRC / "training" / "trainer.py").read_text()
    assert "lora_rank" not in text and "RESUME_KEYS = (" not in text.replace("TRAINER_RESUME_KEYS = (", "")
    for name, cls in REGISTRY.items():
        fields = {f.name for f in dataclasses.fields(cls.Config)}
        assert set(cls.resume_keys) <= fields, name
    assert "lora_rank" in REGISTRY["lcm"].resume_keys and "fake_score_lora_rank" in REGISTRY["dmd2"].resume_keys


def test_a_method_key_change_is_refused_on_resume(tmp_path):
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / ck.STATE_JSON).write_text(json.dumps({"config": {"method": "dmd2", "fake_score_lora_rank": 4}}))
    keys = ck.TRAINER_RESUME_KEYS + REGISTRY["dmd2"].resume_keys
    with pytest.raises(ck.ResumeMismatch, match="--fake_score_lora_rank 4 there, 8 now"):
        ck.check_resume_settings(ckpt, {"method": "dmd2", "fake_score_lora_rank": 8}, keys)


def test_stateful_objects_resume_by_name_when_a_method_adds_one(two_checkpoints, tiny_teacher, caption_folder,
                                                                tmp_path, monkeypatch, caplog):
    """A newer method version registers a new object first: by name, the old checkpoint's target still
    lands in the target (by position it would land in the new object)."""

    class Counter:
        def __init__(self):
            self.n = 7

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, d):
            self.n = d["n"]

    real = LCM.stateful
    monkeypatch.setattr(LCM, "stateful", lambda self: {"counter": Counter(), **real(self)})
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    caplog.set_level(logging.WARNING, logger="fewstep")
    tr = Trainer(parse_run(run_args(tiny_teacher, caption_folder, out, max_train_steps=4, checkpointing_steps=2,
                                    resume_from_checkpoint="checkpoint-4")))
    tr.start()
    saved = ck.read_state_file(out / "checkpoint-4")["objects"]["target"]
    now = tr.objects["target"].state_dict()
    assert all(torch.equal(saved[k], now[k]) for k in saved)
    assert tr.objects["counter"].n == 7 and "holds no state for counter" in caplog.text


def test_memory_hints_come_from_the_method(tiny_teacher, caption_folder, tmp_path, monkeypatch):
    """The out-of-memory advice names LoRA only for methods that have it."""
    from fewstep.methods.teacher import Teacher

    def oom(self, *a):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Teacher, "loss", oom)
    args = run_args(tiny_teacher, caption_folder, tmp_path / "o", method="teacher", teacher_preset="tiny")
    args = [a for a in args]
    i = args.index("--pretrained_teacher_model")
    del args[i:i + 2]
    args += ["--vae_train_steps", "1"]  # one VAE step, then the denoiser's loss (which runs out of memory)
    with pytest.raises(SystemExit) as e:
        main(["distill", *args])
    msg = str(e.value.code)
    assert msg.startswith("out of GPU memory") and "lora" not in msg.lower()
    assert Teacher.memory_hints(None, None) == []
    assert any("--lora_rank 64" in h for h in LCM.memory_hints(None, parse_run(run_args("t", "d", "o")).method))
