"""DisBack on the tiny teacher: the degradation path (full weights or LoRA deltas), strict target switches
that change the real score's weights at every switch and end on the teacher, stages run alone, and
exact resume across the stage boundary."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.config import ConfigError
from fewstep.methods.disback import DisBack
from fewstep.training.trainer import Trainer


def disback_args(teacher, data, out, **kw):
    args = dict(method="disback", dfake_gen_update_ratio=1, learning_rate=1e-3, real_guidance_scale=2.0,
                degradation_steps=3, degradation_interval=1, interval=1, max_train_steps=6)
    args.update(kw)
    # the defaults a single stage does not use (it refuses them as options that change nothing)
    unused = {"degradation": ("degradation_steps", "interval", "dfake_gen_update_ratio", "real_guidance_scale"),
              "backtracking": ("degradation_steps", "degradation_interval")}.get(args.get("disback_stage"), ())
    args = {k: v for k, v in args.items() if k in kw or k not in unused}
    return run_args(teacher, data, out, **args)


def _target_weights(m):
    """The real score's own weights right now: the target adapter, the target UNet, or the teacher."""
    if m.current_target() is None:
        return None
    if m.lora:
        return {k: v.detach().clone() for k, v in m._weights("target").items()}
    return {k: v.detach().clone() for k, v in m.target_unet.state_dict().items()}


@pytest.mark.parametrize("lora", [pytest.param(False, marks=pytest.mark.slow), True])
def test_degradation_path_then_backtracking_switches_targets(lora, tiny_teacher, caption_folder, tmp_path):
    from diffusers import UNet2DConditionModel

    kw = dict(fake_score_lora_rank=4) if lora else {}
    tr = Trainer(parse_run(disback_args(tiny_teacher, caption_folder, tmp_path / "o", **kw)))
    tr.start()
    m = tr.method
    gen = tr.acc.unwrap_model(m.generator)
    gen0 = {k: v.clone() for k, v in gen.state_dict().items()}

    # Stage 1: three fake-score steps, a path point after each; the generator does not move.
    for _ in range(3):
        assert m.phase(tr.state.step) == "guidance"
        logs = tr.step()
        assert "loss_degradation" in logs
    assert all(torch.equal(v, gen.state_dict()[k]) for k, v in gen0.items())
    path = tmp_path / "o" / "degradation_path"
    info = json.loads((path / "path.json").read_text())
    assert info == {"lora": lora, "points": [f"point-{i:07d}.safetensors" for i in (1, 2, 3)]}
    points = [load_file(str(path / p)) for p in info["points"]]
    if lora:  # LoRA deltas only: no base weight in the path
        assert all(".lora_A." in k or ".lora_B." in k for k in points[0])
    else:
        assert points[0].keys() == UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet").state_dict().keys()
    assert any(not torch.equal(points[0][k], points[2][k]) for k in points[0])  # the score degraded

    # Stage 2 began: s_φ = the path's end, the first target = the point before it.
    assert m.state.stage == "backtracking" and m.state.stage2_start == 3
    fake = m._weights("default")
    assert all(torch.equal(fake[k].float(), points[2][k]) for k in points[2])
    seen = [_target_weights(m)]
    assert all(torch.equal(seen[0][k].float(), points[1][k]) for k in points[1])
    phases = []
    for _ in range(3):
        phases.append(m.phase(tr.state.step))
        tr.step()
        seen.append(_target_weights(m))
    assert phases == ["generator", "guidance", "generator"]
    # Every switch changed the target: point 2 → point 1 → the teacher (and it stays there).
    assert all(torch.equal(seen[1][k].float(), points[0][k]) for k in points[0])
    assert any(not torch.equal(seen[0][k], seen[1][k]) for k in seen[0])
    assert seen[2] is None and seen[3] is None and m.current_target() is None
    ref = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    z, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 300])
    c = tr.bundle.encode_text(["a photo of a cat", "a handwritten digit one"])
    with torch.no_grad():
        assert torch.allclose(m.real_score(z, t, c), ref(z, t, encoder_hidden_states=c["encoder_hidden_states"]).sample,
                              atol=1e-5)
    assert any(not torch.equal(v, gen.state_dict()[k]) for k, v in gen0.items())  # stage 2 trains G


def test_target_load_is_strict(tiny_teacher, caption_folder, tmp_path):
    from safetensors.torch import save_file

    tr = Trainer(parse_run(disback_args(tiny_teacher, caption_folder, tmp_path / "o")))
    tr.start()
    for _ in range(3):
        tr.step()
    bad = tmp_path / "o" / "degradation_path" / "point-0000002.safetensors"
    sd = load_file(str(bad))
    save_file({f"unet.{k}": v for k, v in sd.items()}, str(bad))  # prefixed keys, as the public code's trap
    tr.method.state.target_index = 0
    with pytest.raises(RuntimeError, match="does not fit the .target. network: missing"):
        tr.method.load_target()


def test_stages_alone(tiny_teacher, caption_folder, tmp_path):
    d = tmp_path / "deg"
    assert main(["distill", *disback_args(tiny_teacher, caption_folder, d, disback_stage="degradation",
                                          max_train_steps=2, fake_score_lora_rank=4)]) == 0
    assert json.loads((d / "degradation_path" / "path.json").read_text())["points"] == [
        "point-0000001.safetensors", "point-0000002.safetensors"]
    assert not (d / "unet").exists()
    with pytest.raises(ConfigError, match="fake_score_lora_rank"):  # the path is LoRA: so must the run be
        Trainer(parse_run(disback_args(tiny_teacher, caption_folder, tmp_path / "x", disback_stage="backtracking",
                                       degradation_path=str(d / "degradation_path"))))
    tr = Trainer(parse_run(disback_args(tiny_teacher, caption_folder, tmp_path / "back", disback_stage="backtracking",
                                        degradation_path=str(d / "degradation_path"), fake_score_lora_rank=4,
                                        max_train_steps=2)))
    m = tr.method
    end = load_file(str(d / "degradation_path" / "point-0000002.safetensors"))
    assert all(torch.equal(m._weights("default")[k].float(), end[k]) for k in end)
    assert m.current_target() == "point-0000001.safetensors" and m.phase(0) == "generator"
    with pytest.raises(ConfigError, match="degradation_path"):
        parse_run(disback_args(tiny_teacher, caption_folder, tmp_path, disback_stage="backtracking"))
    with pytest.raises(ConfigError, match="no backtracking steps"):
        Trainer(parse_run(disback_args(tiny_teacher, caption_folder, tmp_path / "y", degradation_steps=6)))


@pytest.mark.slow
def test_resume_across_the_stage_boundary_is_exact(tiny_teacher, caption_folder, tmp_path, monkeypatch):
    common = dict(max_train_steps=6, checkpointing_steps=6, fake_score_lora_rank=4)
    assert main(["distill", *disback_args(tiny_teacher, caption_folder, tmp_path / "a", **common)]) == 0
    real_loss = DisBack.loss

    def preempted(self, phase, batch, step):
        if step == 3:  # the first backtracking step: stop after it
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(self, phase, batch, step)

    monkeypatch.setattr(DisBack, "loss", preempted)
    args_b = disback_args(tiny_teacher, caption_folder, tmp_path / "b", resume_from_checkpoint="latest", **common)
    assert main(["distill", *args_b]) == 128 + signal.SIGTERM  # stopped after saving
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-4"]
    monkeypatch.setattr(DisBack, "loss", real_loss)
    assert main(["distill", *args_b]) == 0

    a, b = tmp_path / "a" / "checkpoint-6", tmp_path / "b" / "checkpoint-6"
    for name in ("model.safetensors", "model_1.safetensors"):  # generator; the UNet with fake + target adapters
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    from fewstep.training.checkpoint import read_state_file

    sa, sb = (read_state_file(p)["objects"]["disback"] for p in (a, b))
    assert sa == sb == {"stage": "backtracking", "stage2_start": 3, "target_index": 2,
                        "path": [f"point-{i:07d}.safetensors" for i in (1, 2, 3)]}
    for name in ("optimizer.bin", "optimizer_1.bin"):
        oa, ob = (torch.load(p / name, weights_only=False) for p in (a, b))
        assert all(torch.equal(oa["state"][i]["exp_avg"], ob["state"][i]["exp_avg"]) for i in oa["state"])
