"""`fewstep demo`: the first command a newcomer runs. No arguments, no downloads.

Distils the bundled MNIST teacher (``assets/teacher_mnist``, trained by ``fewstep train-teacher``)
with latent consistency distillation on whatever device is there, then evaluates teacher and
student at 1/2/4 steps against 1,000 held-out digits and prints the headline numbers.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parent / "assets"
TEACHER = ASSETS / "teacher_mnist"
SUBSET = ASSETS / "mnist_subset.npz"

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
    validation_steps=100,
    validation_prompts=[f"a handwritten digit {w}" for w in
                        ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")],
    validation_inference_steps=[1, 2, 4],
    validation_guidance_scale=4.0,
    checkpointing_steps=100,
    checkpoints_total_limit=1,
    report_to="tensorboard",
    seed=0,
)


def write_subset_folder(out_dir: Path, split: str = "train", limit: int | None = None) -> Path:
    """The shipped MNIST digits as a 32×32 PNG folder with .txt captions (the trainer's folder format)."""
    from PIL import Image

    from .eval.mnist import caption_for

    data = np.load(SUBSET)
    images, labels = data[f"{split}_images"], data[f"{split}_labels"]
    n = len(images) if limit is None else min(limit, len(images))
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.pad(images[i], 2)).save(out_dir / f"{i:05d}.png")
        (out_dir / f"{i:05d}.txt").write_text(caption_for(int(labels[i])))
    return out_dir


def eval_reference():
    """The 1,000 held-out digits as images in [0, 1], shape (1000, 3, 32, 32)."""
    import torch

    data = np.load(SUBSET)
    x = torch.from_numpy(np.pad(data["eval_images"], ((0, 0), (2, 2), (2, 2)))).float() / 255
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


def run_demo(out_dir: str = "fewstep-demo", max_train_steps: int | None = None, num_images: int = 400,
             steps=(1, 2, 4), extra: dict | None = None) -> dict:
    from .cli import method_configs
    from .config import resolve
    from .eval.metrics import DigitFeatures
    from .eval.run import EvalRun, evaluate
    from .training.trainer import Trainer

    out = Path(out_dir)
    t0 = time.time()
    data = write_subset_folder(out / "data")
    cfg = {**DEMO_DISTILL, **(extra or {}), "pretrained_teacher_model": str(TEACHER), "train_data_dir": str(data),
           "output_dir": str(out / "student")}
    if max_train_steps is not None:
        cfg["max_train_steps"] = max_train_steps
    Trainer(resolve(cfg, method_configs())).train()
    t_train = time.time() - t0

    # Teacher and student at the teacher's recommended guidance (CFG 4 = the student's w 3).
    gs = DEMO_DISTILL["validation_guidance_scale"]
    student = str(out / "student")
    runs = [EvalRun("teacher", str(TEACHER), "ddim", 25, gs)]
    runs += [EvalRun("teacher", str(TEACHER), "ddim", n, gs) for n in steps]
    runs += [EvalRun("student", student, "lcm", n, gs) for n in steps]
    results = evaluate(runs, eval_reference(), DigitFeatures(), num_images, out / "report")
    by = {(r.label, r.scheduler, r.steps): r for r in results}
    summary = {"train_seconds": round(t_train, 1), "total_seconds": round(time.time() - t0, 1),
               "report": str(out / "report" / "report.md"), "guidance_scale": gs,
               "teacher_ddim_25": by[("teacher", "ddim", 25)].frechet_distance}
    for n in steps:
        summary[f"teacher_ddim_{n}"] = by[("teacher", "ddim", n)].frechet_distance
        summary[f"student_{n}"] = by[("student", "lcm", n)].frechet_distance
    return summary
