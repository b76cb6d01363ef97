"""--fsdp in one process (a one-rank device mesh: the code path of N ranks, without the launcher): the
sharded run trains what the plain run trains, its sharded checkpoint converts offline to exactly the
run's own export, and the settings that cannot hold under sharding are refused before any model loads.
Two real processes: tests/test_sharding_multiprocess.py (slow tier)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def distill(*argv, expect=0):
    # a process of its own: --fsdp starts a (one-rank) process group that must not outlive the run
    r = subprocess.run([sys.executable, "-m", "fewstep", "distill", *map(str, argv)], capture_output=True, text=True,
                       env=ENV, timeout=600)
    assert r.returncode == expect, r.stderr[-4000:]
    return r


def unet(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "unet" / "diffusion_pytorch_model.safetensors"))


LCM_KW = dict(max_train_steps=3, checkpointing_steps=3, learning_rate=1e-3, rng_streams="batch")


@pytest.fixture(scope="module")
def plain_lcm(tiny_teacher, caption_folder, tmp_path_factory) -> Path:
    """The plain (unsharded) lcm run the one-rank --fsdp runs below are compared with."""
    out = tmp_path_factory.mktemp("plain-lcm") / "plain"
    distill(*run_args(tiny_teacher, caption_folder, out, **LCM_KW))
    return out


def test_one_rank_fsdp_trains_what_the_plain_run_trains_and_exports_offline(tiny_teacher, caption_folder, plain_lcm,
                                                                             tmp_path):
    """lcm, 3 steps, per-batch random streams on both sides: the sharded run's export equals the plain
    run's (one rank: the same sums up to fp32 rounding, each tensor within 1e-5 of its norm); its checkpoint holds the
    sharded state in the manifest, and `fewstep export --from_checkpoint` writes the run's own export
    byte for byte."""
    kw = LCM_KW
    # (with the networks' gradient checkpointing, which recomputes each block's forward inside backward:
    # the same numbers)
    distill(*run_args(tiny_teacher, caption_folder, tmp_path / "fsdp", fsdp="true", gradient_checkpointing="true", **kw))
    a, b = unet(plain_lcm), unet(tmp_path / "fsdp")
    start = unet(tiny_teacher)
    assert a.keys() == b.keys()
    assert any(k in start and not torch.equal(a[k], start[k]) for k in a)  # it trained
    for k in a:
        assert float((a[k].double() - b[k].double()).norm()) <= 1e-5 * max(float(a[k].double().norm()), 1e-12), k

    ckpt = tmp_path / "fsdp" / "checkpoint-3"
    files = json.loads((ckpt / "fewstep_complete").read_text())["files"]
    assert {"sharded/.metadata", "sharded/__0_0.distcp"} <= set(files)
    assert not any(f.startswith("model") for f in files)  # the networks are in the sharded state only
    r = subprocess.run([sys.executable, "-m", "fewstep", "export", "--from_checkpoint", str(ckpt), "--output_dir",
                        str(tmp_path / "offline")], capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    for f in ("unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json"):
        assert (tmp_path / "fsdp" / f).read_bytes() == (tmp_path / "offline" / f).read_bytes(), f
    # the same converter reads a plain (accelerate) checkpoint
    r = subprocess.run([sys.executable, "-m", "fewstep", "export", "--from_checkpoint",
                        str(plain_lcm / "checkpoint-3"), "--output_dir", str(tmp_path / "offline-plain")],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert unet(tmp_path / "offline-plain").keys() == a.keys()
    assert all(torch.equal(unet(tmp_path / "offline-plain")[k], a[k]) for k in a)

    # a sharded checkpoint resumed without --fsdp is refused, naming the setting (exit 2)
    r = distill(*run_args(tiny_teacher, caption_folder, tmp_path / "fsdp", resume_from_checkpoint=str(ckpt),
                          **{**kw, "max_train_steps": 4}), expect=2)
    assert "--fsdp" in r.stderr


def test_one_rank_fsdp_with_named_unit_classes(tiny_teacher, caption_folder, plain_lcm, tmp_path):
    """--fsdp_wrap (accelerate's fsdp_transformer_layer_cls_to_wrap): the units are the instances of the
    named classes — the log counts them per network, each network's root adding one — and the run trains
    what the plain run trains; a class no network has is refused naming the classes there are."""
    from diffusers import UNet2DConditionModel

    names = ["ResnetBlock2D", "BasicTransformerBlock"]
    r = distill(*run_args(tiny_teacher, caption_folder, tmp_path / "wrap", fsdp="true", fsdp_wrap=",".join(names),
                          **LCM_KW))
    n = sum(type(m).__name__ in names for m in UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet").modules())
    student = [line for line in r.stderr.splitlines() if line.split()[:1] == ["student"]]
    assert student and f"({n + 1} units)" in student[0], (n, student)
    a, b = unet(plain_lcm), unet(tmp_path / "wrap")
    for k in a:
        assert float((a[k].double() - b[k].double()).norm()) <= 1e-5 * max(float(a[k].double().norm()), 1e-12), k
    r = distill(*run_args(tiny_teacher, caption_folder, tmp_path / "bad", fsdp="true", fsdp_wrap="NoSuchBlock",
                          **LCM_KW), expect=2)
    assert "--fsdp_wrap NoSuchBlock: no module" in r.stderr and "ResnetBlock2D" in r.stderr


def denoiser(out: Path) -> dict[str, torch.Tensor]:
    """The exported denoiser's weights, whatever the family calls its folder."""
    from safetensors.torch import load_file

    (f,) = [f for f in Path(out).glob("*/diffusion_pytorch_model.safetensors") if f.parent.name != "vae"]
    return load_file(str(f))


@pytest.mark.parametrize("family", ["sd", pytest.param("sd3", marks=pytest.mark.slow),
                                    pytest.param("flux", marks=pytest.mark.slow)])
def test_one_rank_fsdp_dmd2_with_its_gan_terms_trains_what_the_plain_run_trains(family, tiny_teacher, caption_folder,
                                                                                  tmp_path):
    """DMD2 with both GAN terms under --fsdp: the head reads a feature inside the sharded fake score, so
    the sharded backward must still run through the whole network (methods/dmd2.py FakeScore.whole_backward;
    without it this run stops with "data is not allocated" or leaves the input layers' gradients unreduced).
    Three steps (generator, fake score + discriminator, generator) on one rank equal the plain run: the
    exported generator within 1e-5 of its norm, each tensor within 1e-4 of its own. (--gan_head pooled: the
    default head's GroupNorm on a 1×1 map of this 32-px teacher turns the fp32 rounding differences of
    the generated batch, ~1e-6, into ~1e-3 of its gradient — measured; the sharded path is the same.)"""
    from fewstep import testing

    teacher = tiny_teacher if family == "sd" else getattr(testing, f"build_tiny_{family}")(tmp_path / "teacher")
    kw = dict(method="dmd2", dfake_gen_update_ratio=1, max_train_steps=3, learning_rate=1e-3, rng_streams="batch",
              gen_cls_loss_weight=0.5, guidance_cls_loss_weight=0.5, gan_head="pooled", disable_tqdm="true")
    distill(*run_args(teacher, caption_folder, tmp_path / "plain", **kw))
    r = distill(*run_args(teacher, caption_folder, tmp_path / "fsdp", fsdp="true", **kw))
    assert "gen_cls_loss" in r.stderr and "guidance_cls_loss" in r.stderr  # both terms ran
    a, b, start = denoiser(tmp_path / "plain"), denoiser(tmp_path / "fsdp"), denoiser(teacher)
    assert a.keys() == b.keys()
    assert any(k in start and not torch.equal(b[k], start[k]) for k in b)  # it trained
    num = den = 0.0
    for k in a:
        d, scale = float((a[k].double() - b[k].double()).norm()), float(a[k].double().norm())
        assert d <= 1e-4 * max(scale, 1e-12), (k, d, scale)
        num, den = num + d * d, den + scale * scale
    assert num ** 0.5 <= 1e-5 * den ** 0.5


@pytest.mark.parametrize("extra,needle", [
    (dict(fsdp="true", mixed_precision="fp16"), "use --mixed_precision bf16"),
    (dict(fsdp="true", use_8bit_adam="true"), "drop --use_8bit_adam"),
    (dict(fsdp_offload="true"), "without --fsdp"),
    (dict(fsdp="true", fsdp_frozen="half"), "--fsdp_frozen must be auto, shard or replicate"),
    (dict(rng_streams="per_gpu"), "--rng_streams must be auto, rank or batch"),
])
def test_settings_sharding_cannot_honour_are_refused(extra, needle, tmp_path):
    from fewstep.cli import parse_run
    from fewstep.config import ConfigError

    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("-", r"\-")):
        parse_run(run_args("t", "d", tmp_path / "o", **extra))


def test_dry_run_reports_the_bytes_each_rank_holds(tiny_teacher, caption_folder, capsys, tmp_path):
    """--dry_run --fsdp builds the method on the meta device and prints, per network, how it is held and
    the bytes per rank: for the trained student weights + gradients + two AdamW moments (fp32: 16 bytes
    a parameter), 1/N of them per rank; the small frozen teacher stays whole on every rank."""
    from diffusers import UNet2DConditionModel

    from fewstep.cli import main, parse_run
    from fewstep.training.sharding import dry_run_plan

    argv = run_args(tiny_teacher, caption_folder, tmp_path / "o", fsdp="true", dry_run="true")
    assert main(["distill", *argv]) == 0
    out = capsys.readouterr().out
    assert out.count("sharding on 1 process(es)") == 1 and out.count("sharding on 8 process(es)") == 1, out
    # (the sharding table's student rows; the memory plan's student row has a number in that column)
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("student")]
    assert [r[4] for r in rows if len(r) > 4 and r[4].isalpha()] == ["sharded"] * 2

    spec = parse_run(argv)
    held, rest = dry_run_plan(spec, spec.method_cls.preflight(spec.train, spec.method), 8)
    by = {h.name: h for h in held}
    n = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet").parameters())
    student = by["student"]
    assert student.shard and student.params >= n  # (+ the guidance embedding's projection)
    assert student.per_rank(1)["total"] == 16 * student.params
    assert student.per_rank(8)["total"] == sum(-(-4 * student.params // 8) for _ in range(2)) + \
        -(-8 * student.params // 8)
    assert by["target"].shard and by["target"].per_rank(8)["total"] == -(-4 * by["target"].params // 8)
    assert not by["teacher"].shard and by["teacher"].per_rank(8)["total"] == 4 * n
    assert {name for name, _ in rest} == {"vae", "text_encoder"}


@pytest.mark.slow  # two runs, ~25 s on 2 shared cores
def test_one_rank_fsdp_dmd2_bf16_with_the_teacher_sharded(tiny_teacher, caption_folder, tmp_path):
    """The options the first test leaves at their defaults, on dmd2 (two trained networks that take turns,
    each frozen during the other's phase) with the frozen real score sharded too (--fsdp_frozen shard):
    bf16 through FSDP's mixed-precision policy (weights gathered in bf16, fp32 master shards, gradients
    reduced in fp32 although the network was frozen when the step began). The run trains (the generator
    moves) and its logged losses follow the plain bf16 run's (autocast and FSDP's policy round in
    different places: within 2 %, where a wrong generator step moves the loss by far more)."""
    extra = dict(mixed_precision="bf16")
    kw = dict(method="dmd2", dfake_gen_update_ratio=1, max_train_steps=2, learning_rate=1e-3,
              rng_streams="batch", report_to="tensorboard", **extra)
    distill(*run_args(tiny_teacher, caption_folder, tmp_path / "plain", **kw))
    r = distill(*run_args(tiny_teacher, caption_folder, tmp_path / "fsdp", fsdp="true", fsdp_frozen="shard", **kw))
    table = r.stderr[r.stderr.index("sharding on 1 process"):]
    assert "real_score" in table or "teacher" in table
    assert "replicated" not in table.split("vae")[0]  # every denoiser sharded (--fsdp_frozen shard)
    a, b, start = unet(tmp_path / "plain"), unet(tmp_path / "fsdp"), unet(tiny_teacher)
    assert any(not torch.equal(b[k], start[k]) for k in start if k in b)
    for k in a:
        assert torch.isfinite(b[k]).all(), k
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars(out):
        runs = list((Path(out) / "logs").rglob("events.out.tfevents.*"))
        ea = EventAccumulator(str(runs[0].parent))
        ea.Reload()
        return {t: [e.value for e in ea.Scalars(t)] for t in ea.Tags()["scalars"] if t.startswith("loss")}

    pa, pb = scalars(tmp_path / "plain"), scalars(tmp_path / "fsdp")
    assert pa.keys() == pb.keys() and pa
    for t in pa:
        assert pb[t] == pytest.approx(pa[t], rel=0.02), t
