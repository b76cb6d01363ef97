"""DMD2 vs DisBack on the bundled MNIST teacher: one-step Fréchet distance as a function of training
iterations, same budget, data and seeds, and the final one-step distance and digit accuracy.

DisBack's claim (arXiv 2408.15991) is faster convergence than DMD-style distillation from the teacher
alone. Both runs here have the same total optimizer steps; DisBack spends ``--degradation_steps`` of
them on stage 1 (fake-score steps only, no generator update), so the curves are plotted against
generator updates and against total optimizer steps.

    python benchmarks/quality_mnist/run_dmd2.py --max_train_steps 450 --eval_every 45 --num_images 300
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
from fewstep.eval.metrics import DigitFeatures, digit_accuracy, feature_stats, frechet_distance
from fewstep.eval.mnist import label_from_prompt
from fewstep.eval.run import make_prompts
from fewstep.training.trainer import Trainer

HERE = Path(__file__).resolve().parent
# (no validation grids here: the demo's validation options and its --learning_rate, which both groups'
# own learning rates replace, would be refused as options that change nothing)
COMMON = {k: v for k, v in DEMO_DISTILL.items() if k not in ("w_min", "w_max", "ema_decay", "loss_type", "huber_c",
                                                             "learning_rate", "validation_prompts",
                                                             "validation_inference_steps", "validation_guidance_scale")}
COMMON.update(lr_scheduler="constant", lr_warmup_steps=0, validation_steps=0, real_guidance_scale=4.0,
              max_grad_norm=10.0, report_to="none")


def one_step_scores(method, prompts, seeds, extractor, ref_stats, batch=250):
    """One-step samples of the current generator → (Fréchet distance, digit accuracy)."""
    imgs = torch.cat([method.sample(prompts[i:i + batch], seeds[i:i + batch], 1, 0.0).cpu()
                      for i in range(0, len(prompts), batch)])
    with torch.no_grad():
        fd = frechet_distance(*ref_stats, *feature_stats(extractor(imgs)))
    acc = digit_accuracy(imgs, torch.tensor([label_from_prompt(p) for p in prompts]))
    return fd, acc


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/fewstep-dmd2-mnist")
    p.add_argument("--record", default=str(HERE))
    p.add_argument("--max_train_steps", type=int, default=450)
    p.add_argument("--eval_every", type=int, default=45)
    p.add_argument("--num_images", type=int, default=300)
    p.add_argument("--degradation_steps", type=int, default=60)
    p.add_argument("--degradation_interval", type=int, default=15)
    p.add_argument("--interval", type=int, default=30)
    p.add_argument("--generator_lr", type=float, default=2e-5)
    p.add_argument("--guidance_lr", type=float, default=1e-4)
    p.add_argument("--dfake_gen_update_ratio", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", nargs="+", default=["dmd2", "disback"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the 2 CPU cores are shared)")
    p.add_argument("--name", default="RESULTS_dmd2", help="file name of the record (.md and .json)")
    p.add_argument("--from_json", default=None, help="only re-render the markdown of a recorded JSON")
    a = p.parse_args()
    if a.from_json:
        render(a, json.loads(Path(a.from_json).read_text()))
        return 0
    torch.set_num_threads(a.threads)
    COMMON.update(generator_lr=a.generator_lr, guidance_lr=a.guidance_lr, dfake_gen_update_ratio=a.dfake_gen_update_ratio)
    out = Path(a.work)
    data = write_subset_folder(out / "data")
    extractor = DigitFeatures()
    with torch.no_grad():
        ref_stats = feature_stats(extractor(eval_reference()))
    prompts = make_prompts(a.num_images, None)
    seeds = list(range(a.num_images))
    runs = {
        "dmd2": {"method": "dmd2"},
        "disback": {"method": "disback", "degradation_steps": a.degradation_steps,
                    "degradation_interval": a.degradation_interval, "interval": a.interval},
    }
    runs = {k: v for k, v in runs.items() if k in a.methods}
    curves, timings = {}, {}
    for name, extra in runs.items():
        cfg = {**COMMON, **extra, "pretrained_teacher_model": str(TEACHER), "train_data_dir": str(data),
               "output_dir": str(out / name), "max_train_steps": a.max_train_steps, "seed": a.seed,
               "checkpointing_steps": a.max_train_steps}
        tr = Trainer(resolve(cfg, method_configs()))
        tr.start()
        curve, gen_updates, train_s = [], 0, 0.0
        fd, acc = one_step_scores(tr.method, prompts, seeds, extractor, ref_stats)
        curve.append({"step": 0, "generator_updates": 0, "frechet": fd, "accuracy": acc})
        while tr.state.step < a.max_train_steps:
            t0 = time.time()
            gen_updates += tr.method.phase(tr.state.step) == "generator"
            tr.step()
            train_s += time.time() - t0
            if tr.state.step % a.eval_every == 0 or tr.state.step == a.max_train_steps:
                fd, acc = one_step_scores(tr.method, prompts, seeds, extractor, ref_stats)
                curve.append({"step": tr.state.step, "generator_updates": gen_updates, "frechet": fd, "accuracy": acc})
                print(name, curve[-1], flush=True)
        curves[name], timings[name] = curve, round(train_s, 1)

    record = {"command": f"python {' '.join(sys.argv)}", "date": time.strftime('%Y-%m-%d'), "curves": curves,
              "timings": timings}
    (Path(a.record) / f"{a.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    render(a, record)
    return 0


def _first(curve, bound):
    return next((c for c in curve if c["frechet"] <= bound), None)


def _at(c):
    return f"step {c['step']} ({c['generator_updates']} generator updates)" if c else "never"


def render(a, record) -> None:
    """RESULTS markdown from a run's curves (also re-renderable from its JSON with --from_json)."""
    t50 = 53.14  # teacher, DDIM 50 steps, guidance 4 (RESULTS.md, 1,000 images)
    curves, timings = record["curves"], record["timings"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    lines = [
        "# DMD2 and DisBack on the bundled MNIST teacher (one step)",
        "",
        f"Command: `{record['command']}`  ",
        f"Device: {device}, {a.threads} torch thread(s), 2 cores shared with other jobs, torch {torch.__version__}, "
        f"{record['date']}. Training seed {a.seed}.  ",
        f"{a.num_images} one-step images per point (prompts cycle over the ten digits, seeds 0..N−1, identical for "
        "every point), Fréchet distance on the digit classifier's features against the 1,000 held-out digits; "
        f"digit accuracy = the classifier reads the prompted digit. Training: batch {COMMON['train_batch_size']}, "
        f"{a.max_train_steps} optimizer steps each, generator lr {a.generator_lr:g}, fake-score lr {a.guidance_lr:g}, "
        f"real guidance 4 (the teacher's CFG), dfake_gen_update_ratio {a.dfake_gen_update_ratio}, full-model fake "
        f"score. DisBack: {a.degradation_steps} degradation steps (a path point every {a.degradation_interval}), "
        f"then backtracking with a target switch every {a.interval} steps.",
        "",
        "| method | optimizer step | generator updates | Fréchet distance | digit accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, curve in curves.items():
        for c in curve:
            lines.append(f"| {name} | {c['step']} | {c['generator_updates']} | {c['frechet']:.2f} | "
                         f"{100 * c['accuracy']:.1f}% |")
    lines += ["", "## Findings", ""]
    for name, curve in curves.items():
        f, best = curve[-1], min(curve, key=lambda c: c["frechet"])
        lines.append(f"- {name}: final one-step distance {f['frechet']:.2f} (accuracy {100 * f['accuracy']:.1f}%), "
                     f"best {best['frechet']:.2f} at {_at(best)}, {timings[name]} s of training. Target ≤ 1.5× teacher "
                     f"50-step ({1.5 * t50:.2f}): final {'met' if f['frechet'] <= 1.5 * t50 else 'NOT met'} "
                     f"(ratio {f['frechet'] / t50:.2f}); first reached at {_at(_first(curve, 1.5 * t50))}.")
    if set(curves) == {"dmd2", "disback"}:
        dm, db = curves["dmd2"], curves["disback"]
        for what, bound in (("final", dm[-1]["frechet"]), ("best", min(c["frechet"] for c in dm))):
            lines.append(f"- DMD2's {what} distance ({bound:.2f}): DMD2 first at {_at(_first(dm, bound))}, DisBack "
                         f"at {_at(_first(db, bound))}.")
    (Path(a.record) / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
