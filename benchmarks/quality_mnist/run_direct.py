"""Direct distillation (both variants) on the bundled MNIST teacher, on a small CPU budget.

1. `fewstep generate`: the teacher at --teacher_steps DDIM steps with CFG 4 over the ten digit prompts;
   rows say the student runs --student_steps steps at guidance 1 (no CFG). Cached and resumable in --work.
2. `fewstep distill --method direct` with --direct_variant final, then trajectory, same settings.
3. `fewstep eval` machinery: each student at its K (DDIM trailing, guidance 1) next to the teacher's own
   DDIM (trailing) at K steps with CFG 4 and without, on the same prompts and seeds; writes RESULTS_direct.md.

    python benchmarks/quality_mnist/run_direct.py     # the recorded run: see RESULTS_direct.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from fewstep.cli import method_configs
from fewstep.config import resolve
from fewstep.demo import TEACHER, eval_reference
from fewstep.eval.metrics import DigitFeatures
from fewstep.eval.mnist import caption_for
from fewstep.eval.run import EvalRun, evaluate
from fewstep.generate import generate
from fewstep.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
TEACHER_W = 4.0  # the teacher's recommended CFG (fewstep_sampling.json)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/fewstep-quality-mnist-direct", help="data and students (not committed)")
    p.add_argument("--record", default=str(HERE))
    p.add_argument("--images_per_digit", type=int, default=10, help="teacher rows = 10 × this")
    p.add_argument("--teacher_steps", type=int, default=50)
    p.add_argument("--student_steps", type=int, default=4)
    p.add_argument("--max_train_steps", type=int, default=40)
    p.add_argument("--train_batch_size", type=int, default=10)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--num_images", type=int, default=300, help="evaluated images per row")
    p.add_argument("--variants", nargs="+", default=["final", "trajectory"])
    a = p.parse_args()
    work = Path(a.work)
    t0 = time.time()
    data = work / "teacher_data"
    gen = generate(str(TEACHER), str(data), [caption_for(d) for d in range(10)], teacher_steps=a.teacher_steps,
                   teacher_guidance_scale=TEACHER_W, student_steps=a.student_steps, student_guidance_scale=1.0,
                   images_per_prompt=a.images_per_digit, seed=0, save_latents=True, batch_size=100,
                   scheduler="ddim")
    gen_s = round(time.time() - t0, 1)
    K = a.student_steps
    runs = [EvalRun("teacher", str(TEACHER), "ddim", K, TEACHER_W), EvalRun("teacher", str(TEACHER), "ddim", K, 1.0)]
    timings = {}
    for v in a.variants:
        name = f"direct-{v}"
        cfg = {"method": "direct", "direct_variant": v, "pretrained_teacher_model": str(TEACHER),
               "train_data_dir": str(data), "output_dir": str(work / name), "resolution": 32,
               "train_batch_size": a.train_batch_size, "max_train_steps": a.max_train_steps,
               "learning_rate": a.learning_rate, "lr_warmup_steps": 0, "validation_steps": 0,
               "checkpointing_steps": a.max_train_steps, "report_to": "none", "seed": 0,
               # 8×8 latents: memory is no concern, so no per-step recomputation (it costs CPU time here).
               "checkpoint_steps": False}
        t1 = time.time()
        Trainer(resolve(cfg, method_configs())).train()
        timings[name] = round(time.time() - t1, 1)
        runs.append(EvalRun(name, str(work / name), "ddim", K, 1.0))
    t2 = time.time()
    report = Path(a.record) / "report_RESULTS_direct"
    results = evaluate(runs, eval_reference(), DigitFeatures(), a.num_images, report)
    eval_s = round(time.time() - t2, 1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    lines = [
        "# Direct distillation on the bundled MNIST teacher (CPU budget)",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Device: {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.  ",
        f"Teacher data: {gen['rows']} rows (`fewstep generate`, DDIM {a.teacher_steps} steps, CFG {TEACHER_W:g}, "
        f"seeds 0..{gen['rows'] - 1}), {gen_s} s. Students: {a.max_train_steps} steps of batch {a.train_batch_size}, "
        f"full model, lr {a.learning_rate:g}, K = {K} DDIM (trailing) steps at guidance 1 (no CFG). "
        f"Evaluation: {a.num_images} images per row (prompts cycle over the ten digits, seeds 0..N−1), "
        f"{eval_s} s; Fréchet distance on the digit classifier's features against the 1,000 held-out digits.",
        "",
        "| model | sampler | steps | guidance | Fréchet distance | digit accuracy | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.label} | {r.scheduler} | {r.steps} | {r.guidance_scale:g} | {r.frechet_distance:.2f} | "
                     f"{100 * r.digit_accuracy:.1f}% | {r.seconds_per_image:.4f} |")
    lines += ["", "## Training time", ""]
    lines += [f"- {n}: {s} s wall-clock (distillation + export)." for n, s in timings.items()]
    (Path(a.record) / "RESULTS_direct_table.md").write_text("\n".join(lines) + "\n")
    (Path(a.record) / "RESULTS_direct_summary.json").write_text(json.dumps({
        "generate_seconds": gen_s, "train_seconds": timings, "eval_seconds": eval_s,
        "rows": [r.__dict__ for r in results]}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
