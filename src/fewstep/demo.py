"""`fewstep demo`: the first command a newcomer runs. No arguments, no downloads.

Distils the bundled MNIST teacher (``assets/teacher_mnist``, trained by ``fewstep train-teacher``)
with latent consistency distillation on whatever device is there, then evaluates the student at 1/2/4
steps next to the teacher's training-free samplers at the same steps (DDIM, DPM-Solver++, Euler):
Fréchet distance to 1,000 held-out digits, and to the teacher's own many-step samples for the same
prompts and seeds. Ctrl-C stops it with a checkpoint; running it again continues from there.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .eval.mnist import SUBSET, heldout_digits

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER = ASSETS / "teacher_mnist"
eval_reference = heldout_digits  # (the name the benchmarks import)

# The embedded default run: every key is a `fewstep distill` option.
DEMO_DISTILL = dict(
    method="lcm",
    resolution=32,
    center_crop=True,
    train_batch_size=32,
    max_train_steps=250,
    learning_rate=1e-4,
    lr_scheduler="constant_with_warmup",
    lr_warmup_steps=20,
    adam_weight_decay=0.0,
    w_min=2.0,  # the teacher was trained for CFG scale ≈ 4, i.e. w = 3 (scale = 1 + w)
    w_max=5.0,
    ema_decay=0.95,
    loss_type="huber",
    huber_c=0.001,
    validation_steps=250,
    validation_prompts=[f"a handwritten digit {w}" for w in
                        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")],
    validation_inference_steps=[1, 2, 4],
    validation_guidance_scale=4.0,
    checkpointing_steps=50,
    checkpoints_total_limit=1,
    report_to="tensorboard",
    seed=0,
)
BASELINES = ("ddim", "dpm++", "euler")  # the teacher's training-free samplers the student is shown next to
REFERENCE_STEPS = 25  # the teacher's "many-step" samples the distance-to-teacher is measured against


def write_subset_folder(out_dir: Path, split: str = "train", limit: int | None = None) -> Path:
    """The shipped MNIST digits as a 32×32 PNG folder with .txt captions (the trainer's folder format).
    A folder already complete (a rerun of the demo) is kept as it is."""
    from PIL import Image

    from .eval.mnist import caption_for

    data = np.load(SUBSET)
    images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    n = len(images) if limit is None else min(limit, len(images))
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / f"{n - 1:05d}.txt").is_file() and (out_dir / f"{n - 1:05d}.png").is_file():
        return out_dir  # (written last: the folder is complete)
    for i in range(n):
        Image.fromarray(np.pad(images[i], 2)).save(out_dir / f"{i:05d}.png")
        (out_dir / f"{i:05d}.txt").write_text(caption_for(int(labels[i])))
    return out_dir


def bundled(value: str, work: Path) -> str:
    """``fewstep:teacher_mnist`` (or ``fewstep:teacher_mnist_flow``) → the bundled teacher; ``fewstep:mnist_train`` → the bundled training
    digits written as a caption folder under ``work``; anything else unchanged (for compare specs)."""
    if value == "fewstep:teacher_mnist":
        return str(TEACHER)
    if value.startswith("fewstep:teacher_") and (ASSETS / value.split(":", 1)[1] / "model_index.json").is_file():
        return str(ASSETS / value.split(":", 1)[1])  # another bundled teacher (teacher_mnist_flow)
    if value == "fewstep:mnist_train":
        return str(write_subset_folder(work / "data"))
    return value


def run_demo(out_dir: str = "fewstep-demo", max_train_steps: int | None = None, num_images: int = 300,
             steps=(1, 2, 4), extra: dict | None = None) -> dict:
    """Distil (continuing the demo's own checkpoint when there is one), then evaluate; the summary's
    ``stopped`` is True when a signal stopped training (the checkpoint is saved; rerun to continue)."""
    from .eval.metrics import DigitFeatures
    from .eval.run import EvalRun, evaluate
    from .runspec import resolve_run
    from .training.trainer import Trainer

    out = Path(out_dir)
    t0 = time.time()
    data = write_subset_folder(out / "data")
    # The demo's folder is its own: a rerun continues its checkpoint (or finds the run finished).
    cfg = {**DEMO_DISTILL, **(extra or {}), "pretrained_teacher_model": str(TEACHER), "train_data_dir": str(data),
           "output_dir": str(out / "student"), "resume_from_checkpoint": "latest"}
    if max_train_steps is not None:
        cfg["max_train_steps"] = max_train_steps
    trainer = Trainer(resolve_run(cfg))
    trainer.resume_hint = "`fewstep demo` again (it continues from this checkpoint)"
    done = trainer.train()
    t_train = time.time() - t0
    if done is None:
        return {"stopped": True, "step": trainer.state.step, "train_seconds": round(t_train, 1)}

    # Teacher and student at the teacher's recommended guidance (CFG 4 = the student's w 3).
    gs = DEMO_DISTILL["validation_guidance_scale"]
    student = str(out / "student")
    reference = EvalRun("teacher", str(TEACHER), "ddim", REFERENCE_STEPS, gs)
    runs = [reference]
    runs += [EvalRun("teacher", str(TEACHER), b, n, gs) for b in BASELINES for n in steps]
    runs += [EvalRun("student", student, "lcm", n, gs) for n in steps]
    results = evaluate(runs, heldout_digits(), DigitFeatures(), num_images, out / "report", teacher_reference=reference)
    by = {(r.label, r.scheduler, r.steps): r for r in results}
    summary = {"stopped": False, "train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t0, 1),
               "report": str(out / "report" / "report.md"), "guidance_scale": gs, "reference_steps": REFERENCE_STEPS,
               "teacher_reference": by[("teacher", "ddim", REFERENCE_STEPS)].frechet_distance, "steps": {}}
    for n in steps:
        s = by[("student", "lcm", n)]
        base = {b: (by[("teacher", b, n)].frechet_distance, by[("teacher", b, n)].fd_teacher) for b in BASELINES}
        summary["steps"][n] = {"student": (s.frechet_distance, s.fd_teacher), "baselines": base}
    return summary


def print_summary(s: dict, num_images: int) -> None:
    """The demo's headline: the student against the best training-free sampler at each step count, by
    either distance (lower is better)."""
    print(f"\nfewstep demo: distilled in {s['train_seconds']} s, {s['total_seconds']} s in all")
    print(f"Fréchet distance (lower is better), {num_images} images per row, guidance {s['guidance_scale']:g}:\n"
          f"  'real' = to 1,000 held-out digits; 'teacher' = to the teacher's own {s['reference_steps']}-step "
          f"DDIM samples of the same prompts and seeds\n"
          f"  (the teacher's {s['reference_steps']}-step DDIM itself: real {s['teacher_reference']:.1f})")
    print(f"  {'steps':>5}  {'LCD student':>22}  {'best training-free sampler (of ' + ', '.join(BASELINES) + ')':>54}")
    for n, row in s["steps"].items():
        real, teach = row["student"]
        br = min(row["baselines"].items(), key=lambda kv: kv[1][0])
        bt = min(row["baselines"].items(), key=lambda kv: kv[1][1])
        print(f"  {n:>5}  real {real:6.1f}  teacher {teach:6.1f}    real {br[1][0]:6.1f} ({br[0]:5s})  "
              f"teacher {bt[1][1]:6.1f} ({bt[0]:5s})")
    print(f"report: {s['report']}")
