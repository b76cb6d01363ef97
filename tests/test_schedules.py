"""Learning-rate schedules on the reference's clock (issue 15, item 4).

DMD2 (tianweiy/DMD2 main/train_sd.py) runs iterations i = 0, 1, ...: the generator is updated when
i % r == 0, then the fake score once, and BOTH schedulers step at the end of every iteration. So the
generator's update in iteration i and the fake score's update in iteration i both use lr = base · f(i),
f the diffusers schedule (constant_with_warmup: min(1, i / W)). fewstep flattens the loop into a cycle
of r + 1 optimizer steps; these tests replay the reference loop and require the same learning rates,
group by group, update by update.
"""

import math

import pytest

from conftest import run_args
from fewstep.cli import parse_run
from fewstep.config import ConfigError
from fewstep.methods.dmd2 import iteration_of
from fewstep.training.trainer import Trainer


def f_warmup(i, W):
    """diffusers' constant_with_warmup, written out."""
    return i / W if i < W else 1.0


def f_cosine(i, W, T):
    """diffusers' cosine (one half wave after a linear warmup), written out."""
    if i < W:
        return i / W
    return max(0.0, 0.5 * (1 + math.cos(math.pi * (i - W) / max(1, T - W))))


def reference_dmd2_lrs(iters, r, base_g, base_d, f):
    """The learning rates of each update in DMD2's own loop: ([generator updates], [fake-score updates])."""
    gen, fake = [], []
    for i in range(iters):
        if i % r == 0:
            gen.append(base_g * f(i))
        fake.append(base_d * f(i))
    return gen, fake


def replay(tr: Trainer, steps: int):
    """The learning rate each optimizer step uses, by group, driving the trainer's own schedule clock
    (no forward pass: the schedules do not depend on the losses)."""
    used = {n: [] for n in tr.names}
    for s in range(steps):
        phase = tr.method.phase(s)
        used[phase].append(tr.opts[phase].param_groups[0]["lr"])
        tr._tick_schedules(phase, s)
    return used


def dmd2(tiny_teacher, caption_folder, out, **kw):
    # (--learning_rate at its default: both groups have their own)
    args = dict(method="dmd2", generator_lr=2e-4, guidance_lr=1e-4, real_guidance_scale=2.0, learning_rate=1e-6)
    args.update(kw)
    return Trainer(parse_run(run_args(tiny_teacher, caption_folder, out, **args)))


def test_iteration_of_matches_the_reference_loop():
    for r in (1, 3, 10):
        ref = []  # (iteration, group) of every update in DMD2's loop, in order
        for i in range(4 * r):
            ref += [(i, "generator")] * (i % r == 0) + [(i, "guidance")]
        ours = [(iteration_of(s, r), "generator" if s % (r + 1) == 0 else "guidance") for s in range(len(ref))]
        assert ours == ref


@pytest.mark.parametrize("sched", ["constant_with_warmup", "cosine"])
def test_dmd2_learning_rates_follow_the_reference_iterations(sched, tiny_teacher, caption_folder, tmp_path):
    r, W, cycles = 4, 10, 9
    S = cycles * (r + 1)  # 45 optimizer steps = 36 reference iterations
    tr = dmd2(tiny_teacher, caption_folder, tmp_path / "o", dfake_gen_update_ratio=r, lr_scheduler=sched,
              lr_warmup_steps=W, max_train_steps=S)
    iters = cycles * r
    assert tr.method.schedule_length("generator") == tr.method.schedule_length("guidance") == iters
    f = (lambda i: f_warmup(i, W)) if sched == "constant_with_warmup" else (lambda i: f_cosine(i, W, iters))
    ref_g, ref_d = reference_dmd2_lrs(iters, r, 2e-4, 1e-4, f)
    used = replay(tr, S)
    assert used["generator"] == pytest.approx(ref_g, rel=1e-9, abs=1e-15)
    assert used["guidance"] == pytest.approx(ref_d, rel=1e-9, abs=1e-15)
    if sched == "constant_with_warmup":
        # The generator is at full lr from its 4th update on (iteration 12 >= W): after W iterations, not
        # after W generator updates (which would be W·(r+1) = 50 optimizer steps, more than this run).
        assert used["generator"][:4] == pytest.approx([0, 2e-4 * 4 / W, 2e-4 * 8 / W, 2e-4])


def test_real_steps_log_the_reference_learning_rates(tiny_teacher, caption_folder, tmp_path):
    """The same through Trainer.step (forward, backward, optimizer): lr/<group> is the lr each step used."""
    r, W = 2, 3
    tr = dmd2(tiny_teacher, caption_folder, tmp_path / "o", dfake_gen_update_ratio=r,
              lr_scheduler="constant_with_warmup", lr_warmup_steps=W, max_train_steps=6)
    tr.start()
    logged = [tr.step() for _ in range(6)]
    ref_g, ref_d = reference_dmd2_lrs(4, r, 2e-4, 1e-4, lambda i: f_warmup(i, W))
    assert [x["lr/generator"] for x in logged if "lr/generator" in x] == pytest.approx(ref_g)
    assert [x["lr/guidance"] for x in logged if "lr/guidance" in x] == pytest.approx(ref_d)


def test_single_group_schedule_counts_optimizer_steps(tiny_teacher, caption_folder, tmp_path):
    W, S = 3, 12
    tr = Trainer(parse_run(run_args(tiny_teacher, caption_folder, tmp_path / "o", lr_scheduler="cosine",
                                    lr_warmup_steps=W, max_train_steps=S, learning_rate=1e-3)))
    used = replay(tr, S)["student"]
    assert used == pytest.approx([1e-3 * f_cosine(s, W, S) for s in range(S)], abs=1e-15)


def test_disback_stage1_then_dmd2_clock(tiny_teacher, caption_folder, tmp_path):
    """Stage 1 updates the fake score alone, one tick per step; stage 2 is DMD2's iteration clock."""
    S1, r, W = 4, 2, 5
    S = S1 + 3 * (r + 1)
    tr = Trainer(parse_run(run_args(
        tiny_teacher, caption_folder, tmp_path / "o", method="disback", disback_stage="both", degradation_steps=S1,
        degradation_interval=2, interval=3, dfake_gen_update_ratio=r, lr_scheduler="constant_with_warmup",
        lr_warmup_steps=W, max_train_steps=S, learning_rate=1e-3, real_guidance_scale=2.0)))
    m = tr.method
    assert m.schedule_length("guidance") == S1 + 3 * r and m.schedule_length("generator") == 3 * r
    used = {"generator": [], "guidance": []}
    for s in range(S):
        phase = m.phase(s)
        used[phase].append(tr.opts[phase].param_groups[0]["lr"])
        tr._tick_schedules(phase, s)
        if s + 1 == S1:  # what after_step does at the end of stage 1 (without saving a path point)
            m.state.stage, m.state.stage2_start = "backtracking", S1
    stage2_g, stage2_d = reference_dmd2_lrs(3 * r, r, 1e-3, 1e-3, lambda i: f_warmup(i, W))
    assert used["guidance"][:S1] == pytest.approx([1e-3 * f_warmup(i, W) for i in range(S1)])
    # The fake score's clock continues from stage 1 (S1 ticks); the generator's starts at stage 2.
    assert used["guidance"][S1:] == pytest.approx([1e-3 * f_warmup(S1 + i, W) for i in range(3 * r)])
    assert used["generator"] == pytest.approx(stage2_g) and len(stage2_d) == 3 * r


def test_schedules_resume_exactly(tiny_teacher, caption_folder, tmp_path):
    """A checkpoint holds each group's schedule position: a resumed run continues both clocks."""
    r, W, S = 3, 8, 16
    kw = dict(dfake_gen_update_ratio=r, lr_scheduler="cosine", lr_warmup_steps=W, max_train_steps=S,
              checkpointing_steps=100)
    straight = replay(dmd2(tiny_teacher, caption_folder, tmp_path / "a", **kw), S)

    tr = dmd2(tiny_teacher, caption_folder, tmp_path / "b", **kw)
    tr.start()
    first = replay(tr, 7)
    tr.state.step = tr.state.good_steps = 7  # as if 7 steps had run (checkpoints are written after good steps)
    tr.save()
    tr2 = dmd2(tiny_teacher, caption_folder, tmp_path / "b", resume_from_checkpoint="latest", **kw)
    tr2.start()
    assert tr2.state.step == 7
    rest = {n: [] for n in tr2.names}
    for s in range(7, S):
        phase = tr2.method.phase(s)
        rest[phase].append(tr2.opts[phase].param_groups[0]["lr"])
        tr2._tick_schedules(phase, s)
    for n in ("generator", "guidance"):
        assert first[n] + rest[n] == pytest.approx(straight[n], abs=1e-15)


@pytest.mark.parametrize("extra,resolved", [([], 0), (["--lr_scheduler", "cosine"], 500),
                                            (["--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "7"], 7),
                                            (["--lr_warmup_steps", "0"], 0)])
def test_warmup_default_depends_on_the_schedule(extra, resolved, tiny_teacher, caption_folder, tmp_path):
    argv = [a for a in run_args(tiny_teacher, caption_folder, tmp_path) if a]
    i = argv.index("--lr_warmup_steps")
    argv = argv[:i] + argv[i + 2:]  # run_args sets it; here it is left to the default unless given
    assert parse_run(argv + extra).train.lr_warmup_steps == resolved


@pytest.mark.parametrize("argv,match", [
    (["--lr_warmup_steps", "500"], "constant_with_warmup"),  # constant has no warmup
    (["--lr_scheduler", "piecewise_constant"], "not one of"),  # needs step rules no option gives
    (["--lr_scheduler", "cosine", "--lr_warmup_steps", "-1"], ">= 0"),
])
def test_warmup_that_would_be_ignored_is_refused(argv, match, tiny_teacher, caption_folder, tmp_path):
    base = run_args(tiny_teacher, caption_folder, tmp_path)
    i = base.index("--lr_warmup_steps")
    with pytest.raises(ConfigError, match=match):
        parse_run(base[:i] + base[i + 2:] + argv)
