"""Quality of every fewstep method on the bundled MNIST teacher, at fixed budgets.

Distils `src/fewstep/assets/teacher_mnist` with each method below, then evaluates, on the same 1,000
prompts and seeds, the students at 1/2/4/8 steps next to the teacher at 25/50 DDIM steps and the
teacher's own few-step baselines (DDIM with trailing and with SD's default leading spacing,
DPM-Solver++ 2M). Writes RESULTS.md (table, targets, timings, the command) and the eval report.

    python benchmarks/quality_mnist/run.py                      # CPU: ~20 min
    python benchmarks/quality_mnist/run.py --max_train_steps 250 --num_images 400   # the demo's budget
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
from fewstep.demo import DEMO_DISTILL, TEACHER, eval_reference, write_subset_folder
from fewstep.eval.metrics import DigitFeatures
from fewstep.eval.run import EvalRun, evaluate
from fewstep.training.trainer import Trainer

# One entry per method: `fewstep distill` options on top of the demo's LCD settings. Later methods
# (LCM-LoRA, direct distillation, DMD2, DisBack) add their entry here.
METHODS = {
    "lcd": {},
    # LCM-LoRA: guidance baked in at w = 3 (the teacher's CFG 4), sampled without CFG (guidance 1).
    "lcm-lora": {"lora_rank": 16, "learning_rate": 1e-3, "w_min": 3.0, "w_max": 3.0, "validation_guidance_scale": 1.0},
}
HERE = Path(__file__).resolve().parent
GUIDANCE = DEMO_DISTILL["validation_guidance_scale"]  # the teacher's recommended CFG scale


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/fewstep-quality-mnist", help="students and data (not committed)")
    p.add_argument("--record", default=str(HERE), help="where RESULTS.md and report/ are written")
    p.add_argument("--max_train_steps", type=int, default=1000)
    p.add_argument("--num_images", type=int, default=1000)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--name", default="RESULTS", help="file name of the recorded table (and report folder suffix)")
    p.add_argument("--mnist", default=None, help="MNIST IDX folder: train on all 9,000 train digits "
                                                 "instead of the 3,000 bundled ones")
    a = p.parse_args()
    out, record = Path(a.work), Path(a.record)
    out.mkdir(parents=True, exist_ok=True)
    if a.mnist:
        from fewstep.eval.mnist import write_mnist_folder

        data = write_mnist_folder(a.mnist, out / "data", "train")
    else:
        data = write_subset_folder(out / "data")

    runs = [EvalRun("teacher", str(TEACHER), "ddim", n, GUIDANCE) for n in (50, 25)]
    runs += [EvalRun("teacher", str(TEACHER), s, n, GUIDANCE) for s in ("ddim", "ddim-leading", "dpm++")
             for n in (1, 2, 4, 8)]
    timings = {}
    for name in a.methods:
        cfg = {**DEMO_DISTILL, **METHODS[name], "pretrained_teacher_model": str(TEACHER),
               "train_data_dir": str(data), "output_dir": str(out / name), "max_train_steps": a.max_train_steps,
               "validation_steps": a.max_train_steps, "checkpointing_steps": a.max_train_steps}
        t0 = time.time()
        Trainer(resolve(cfg, method_configs())).train()
        timings[name] = round(time.time() - t0, 1)
        gs = METHODS[name].get("validation_guidance_scale", GUIDANCE)
        runs += [EvalRun(name, str(out / name), "lcm", n, gs) for n in (1, 2, 4, 8)]

    report = record / ("report" if a.name == "RESULTS" else f"report_{a.name}")
    results = evaluate(runs, eval_reference(), DigitFeatures(), a.num_images, report)
    by = {(r.label, r.scheduler, r.steps): r.frechet_distance for r in results}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    lines = [
        "# Quality of fewstep methods on the bundled MNIST teacher",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Device: {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}.  ",
        f"{a.num_images} images per row (prompts cycle over the ten digits, seeds 0..N−1, identical for every row), "
        f"guidance scale {GUIDANCE:g} for the teacher and LCD (the teacher's recommended CFG; LCD embeds it), "
        "1 for LCM-LoRA (guidance baked in). "
        "Fréchet distance on the shipped digit classifier's 128-d features against the 1,000 held-out digits "
        "(lower is better); digit accuracy = the classifier reads the digit the prompt asked for.",
        "",
        "| model | sampler | steps | guidance | Fréchet distance | digit accuracy | s / image |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.label} | {r.scheduler} | {r.steps} | {r.guidance_scale:g} | {r.frechet_distance:.2f} | "
                     f"{100 * r.digit_accuracy:.1f}% | {r.seconds_per_image:.4f} |")
    lines += ["", "## Training budgets", ""]
    for name, secs in timings.items():
        lines.append(f"- {name}: {a.max_train_steps} steps of batch {DEMO_DISTILL['train_batch_size']} on "
                     f"{len(list(Path(data).glob('*.png')))} digits, {secs} s wall-clock (distillation + export).")
    lines += ["", "## Targets (issue 3)", ""]
    t50 = by[("teacher", "ddim", 50)]
    for name in timings:
        s4 = by[(name, "lcm", 4)]
        d4, l4 = by[("teacher", "ddim", 4)], by[("teacher", "ddim-leading", 4)]
        lines.append(f"- {name} 4-step ≤ 1.5× teacher 50-step ({1.5 * t50:.2f}): {s4:.2f} → "
                     f"{'met' if s4 <= 1.5 * t50 else 'NOT met'} (ratio {s4 / t50:.2f}).")
        lines.append(f"- {name} 4-step ≤ 1/3 of teacher DDIM 4-step: trailing spacing {d4:.2f} (1/3 = {d4 / 3:.2f}) → "
                     f"{'met' if s4 <= d4 / 3 else 'NOT met'} (ratio {d4 / s4:.2f}×); SD's default leading "
                     f"spacing {l4:.2f} → {'met' if s4 <= l4 / 3 else 'NOT met'} (ratio {l4 / s4:.2f}×).")
    (record / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    (record / f"{a.name}_summary.json" if a.name != "RESULTS" else record / "summary.json").write_text(json.dumps({"timings": timings, "frechet": {
        f"{k[0]}/{k[1]}/{k[2]}": v for k, v in by.items()}}, indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
