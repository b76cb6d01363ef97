"""`fewstep compare`: one teacher, one data set, one training budget, several methods or presets; one report.

A spec (YAML) names what is shared and what differs:

    distill:            # every run: the teacher, the data and the budget (max_train_steps, train_batch_size)
      pretrained_teacher_model: fewstep:teacher_mnist
      train_data_dir: fewstep:mnist_train
      max_train_steps: 1000
      train_batch_size: 32
    runs:               # per run: a method or a preset and its own settings (the budget keys are refused)
      lcd: {method: lcm}
      dmd2: {preset: dmd2/sd15, real_guidance_scale: 4.0}
      direct: {method: direct, teacher_data: {teacher_steps: 50, student_steps: 4, images_per_prompt: 10}}
    eval:
      steps: [1, 2, 4, 8]        # students and the teacher's training-free baselines
      baselines: [dpm++, euler]
      teacher_reference_steps: 50
      num_images: 1000
      eval_points: 4             # checkpoints per run evaluated for quality vs training wall-clock

Each run trains with the fewstep trainer (resumable: a rerun continues every run where it stopped), keeps
``eval_points`` checkpoints, and the time spent in its training loop at each of them. Then one evaluation
scores, for the same prompts and seeds, every student at every step count next to the teacher's baselines
at the same counts: Fréchet distance to real held-out data and to the teacher's own many-step samples
(``eval.teacher``); a second one scores each checkpoint, for the quality-vs-wall-clock curves. A run with
``teacher_data`` first generates its training data with ``fewstep generate`` from the captions of the shared
data (direct distillation); that time is part of its wall-clock.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from .config import ConfigError, load_yaml

BUDGET_KEYS = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_train_epochs",
               "dataset_repeat")
EVAL_DEFAULTS = {"steps": [1, 2, 4, 8], "baselines": ["dpm++", "euler"], "teacher_reference_steps": 50,
                 "teacher_reference_scheduler": "ddim", "guidance_scale": None, "num_images": 1000,
                 "reference": "mnist-heldout", "features": "digits", "eval_points": 4, "wallclock_steps": 4,
                 "batch_size": 250, "resolution": None}
GENERATE_KEYS = {"teacher_steps": 50, "teacher_guidance_scale": None, "student_steps": 4, "student_guidance_scale": 1.0,
                 "images_per_prompt": 10, "teacher_scheduler": "ddim"}
# What a compared run does not need: per-run logs and grids (the comparison has its own report).
RUN_DEFAULTS = {"report_to": "none", "validation_steps": 0}


def load_spec(path: str, overrides: dict[str, Any]) -> dict:
    spec = load_yaml(path)
    unknown = set(spec) - {"distill", "runs", "eval"}
    if unknown:
        raise ConfigError(f"{path}: unknown sections {', '.join(sorted(unknown))} (distill, runs, eval)")
    if not isinstance(spec.get("runs"), dict) or not spec["runs"]:
        raise ConfigError(f"{path}: `runs:` must map labels to settings (at least one run)")
    distill = dict(spec.get("distill") or {})
    distill.update({k: v for k, v in overrides.items() if k in BUDGET_KEYS and v is not None})
    for k in ("max_train_steps", "train_batch_size"):
        if k not in distill:
            raise ConfigError(f"{path}: distill.{k} is required: every run trains on the same budget")
    ev = {**EVAL_DEFAULTS, **(spec.get("eval") or {})}
    ev.update({k: v for k, v in overrides.items() if k in EVAL_DEFAULTS and v is not None})
    bad = set(ev) - set(EVAL_DEFAULTS)
    if bad:
        raise ConfigError(f"{path}: unknown eval keys {', '.join(sorted(bad))} ({', '.join(EVAL_DEFAULTS)})")
    if int(ev["eval_points"]) < 1 or int(ev["num_images"]) < 2:
        raise ConfigError("eval.eval_points must be >= 1 and eval.num_images >= 2")
    runs = {}
    for label, keys in spec["runs"].items():
        keys = dict(keys or {})
        if "/" in str(label) or "@" in str(label):
            raise ConfigError(f"run label {label!r}: no '/' or '@'")
        clash = [k for k in keys if k in BUDGET_KEYS]
        if clash:
            raise ConfigError(f"runs.{label}: {', '.join(clash)} set per run; the budget is shared (distill:)")
        gen = keys.pop("teacher_data", None)
        if gen is not None:
            gen = {**GENERATE_KEYS, **gen}
            if set(gen) - set(GENERATE_KEYS):
                raise ConfigError(f"runs.{label}.teacher_data: unknown keys "
                                  f"{', '.join(sorted(set(gen) - set(GENERATE_KEYS)))} ({', '.join(GENERATE_KEYS)})")
        runs[str(label)] = (keys, gen)
    only = overrides.get("runs")
    if only:
        missing = [r for r in only if r not in runs]
        if missing:
            raise ConfigError(f"--runs {' '.join(missing)}: not in the spec ({', '.join(runs)})")
        runs = {k: v for k, v in runs.items() if k in only}
    return {"distill": distill, "runs": runs, "eval": ev}


def _unique_captions(cfg) -> list[str]:
    from .data import build_dataset

    ds = build_dataset(cfg)
    if not hasattr(ds, "records"):
        raise ConfigError("teacher_data needs prompts from a folder or metadata file (--train_data_dir)")
    return sorted({str(c).strip() for _, c, _ in ds.records if c and str(c).strip()})


class Comparison:
    def __init__(self, spec: dict, out: Path, work: Path):
        from .demo import bundled

        self.spec, self.out, self.work = spec, Path(out), Path(work)
        self.distill = {k: bundled(v, self.work) if isinstance(v, str) else v for k, v in spec["distill"].items()}
        self.ev = spec["eval"]
        self.teacher = self.distill.get("pretrained_teacher_model")
        if not self.teacher:
            raise ConfigError("distill.pretrained_teacher_model is required")
        self.record: dict[str, Any] = {"runs": {}}

    # ---- planning: every run resolved and checked before anything trains ------------------------
    def run_keys(self, label: str, keys: dict, data_dir: str | None = None) -> dict:
        n = int(self.distill["max_train_steps"])
        every = max(1, n // int(self.ev["eval_points"]))
        out = {**RUN_DEFAULTS, **self.distill, **keys, "output_dir": str(self.work / label),
               "checkpointing_steps": every, "checkpoints_total_limit": None, "resume_from_checkpoint": "latest"}
        if data_dir:
            for k in ("train_data_dir", "train_shards_path_or_url", "file_list", "dataset_name", "cache_dir"):
                out.pop(k, None)
            out["train_data_dir"] = data_dir
        return out

    def plan(self):
        from .models.bundle import load_bundle
        from .runspec import resolve_run
        from .training.preflight import check_teacher

        specs = {}
        for label, (keys, gen) in self.spec["runs"].items():
            data_dir = str(self.work / label / "teacher_data") if gen else None
            spec = resolve_run(self.run_keys(label, keys, data_dir))
            if spec.train.pretrained_teacher_model != self.teacher:
                raise ConfigError(f"runs.{label}: every run distils distill.pretrained_teacher_model")
            check_teacher(spec, load_bundle(self.teacher, weights=False))
            specs[label] = spec
        return specs

    # ---- training ---------------------------------------------------------------------------
    def generate_data(self, label: str, gen: dict) -> float:
        """Teacher data for a run that trains on it (direct distillation); the seconds it took, kept beside
        the data so that a rerun (which finds the rows written) still reports them."""
        from .generate import generate
        from .runspec import resolve_run

        record = self.work / label / "teacher_data_seconds.json"
        before = json.loads(record.read_text())["seconds"] if record.is_file() else 0.0
        shared = resolve_run({**RUN_DEFAULTS, **self.distill, "output_dir": str(self.work / label)})
        t0 = time.time()
        gs = gen["teacher_guidance_scale"]
        if gs is None:
            from .eval.run import sampling_hints

            gs = sampling_hints(self.teacher).get("guidance_scale", 1.0)
        generate(self.teacher, str(self.work / label / "teacher_data"), _unique_captions(shared.train),
                 teacher_steps=int(gen["teacher_steps"]), teacher_guidance_scale=float(gs),
                 student_steps=int(gen["student_steps"]), student_guidance_scale=float(gen["student_guidance_scale"]),
                 images_per_prompt=int(gen["images_per_prompt"]), seed=int(self.distill.get("seed", 0)),
                 save_latents=True, batch_size=100, scheduler=gen["teacher_scheduler"], progress=False)
        seconds = before + time.time() - t0
        record.write_text(json.dumps({"seconds": seconds}) + "\n")
        return seconds

    def train(self, label: str, spec) -> dict:
        from .training.trainer import Trainer

        times_file = self.work / label / "compare_times.json"
        times = json.loads(times_file.read_text()) if times_file.is_file() else {}

        def note(step, seconds, path):  # as they come: a rerun after a stop keeps them
            times[str(step)] = seconds
            times_file.write_text(json.dumps(times, indent=1) + "\n")

        trainer = Trainer(spec)
        trainer.on_save.append(note)
        if trainer.train() is None:
            raise KeyboardInterrupt  # stopped by a signal: the checkpoint is saved, a rerun continues
        return {int(k): v for k, v in times.items()}

    def export_at(self, label: str, spec, step: int) -> str:
        """The student of checkpoint ``step``: the run's settings, that checkpoint loaded, exported as it is."""
        from .runspec import resolve_run
        from .training.trainer import Trainer

        folder = self.work / label / f"at-{step}"
        if (folder / "fewstep_sampling.json").is_file():
            return str(folder)
        keys = {**self.run_keys(label, self.spec["runs"][label][0], spec.train.train_data_dir),
                "output_dir": str(folder),
                "resume_from_checkpoint": str((self.work / label / f"checkpoint-{step}").resolve())}
        trainer = Trainer(resolve_run(keys))
        trainer.start()
        trainer.export()
        trainer.acc.end_training()
        return str(folder)

    # ---- the whole comparison ---------------------------------------------------------------
    def run(self) -> dict:
        import torch

        from .diffusion.sampling import check_scheduler
        from .eval.metrics import EXTRACTORS
        from .eval.run import (
            EvalRun,
            can_sample,
            check_runs,
            evaluate,
            load_reference,
            make_prompts,
            plan_runs,
            sampling_hints,
        )
        from .eval.teacher import teacher_images

        ev = self.ev
        for b in ev["baselines"]:
            check_scheduler(b, "eval.baselines")
        check_scheduler(ev["teacher_reference_scheduler"], "eval.teacher_reference_scheduler")
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        gs = ev["guidance_scale"] if ev["guidance_scale"] is not None else \
            sampling_hints(self.teacher).get("guidance_scale", 1.0)
        gen_seconds = {}
        for label, (_, gen) in self.spec["runs"].items():
            if gen:
                gen_seconds[label] = self.generate_data(label, gen)
        specs = self.plan()  # every run checked before the first one trains
        points: dict[str, dict[int, float]] = {}
        for label, spec in specs.items():
            print(f"fewstep compare: training {label} ({spec.train.method}, {spec.train.max_train_steps} steps)")
            points[label] = self.train(label, spec)
            self.record["runs"][label] = {"method": spec.train.method, "preset": spec.train.preset,
                                          "keys": self.spec["runs"][label][0],
                                          "data_seconds": round(gen_seconds.get(label, 0.0), 1),
                                          "train_seconds": round(max(points[label].values(), default=0.0), 1)}

        # Quality vs steps: the students and the teacher's samplers, same prompts and seeds.
        reference = EvalRun("teacher", self.teacher, ev["teacher_reference_scheduler"], int(ev["teacher_reference_steps"]), gs)
        steps = [int(s) for s in ev["steps"]]
        runs = [reference] + [EvalRun("teacher", self.teacher, b, n, gs) for b in ev["baselines"] for n in steps]
        for label in specs:  # each student at the step counts its scheduler can run (one-step DMD2: 1)
            runs += [r for r in plan_runs([(label, str(self.work / label))], steps, [], [], ev["guidance_scale"])
                     if can_sample(r)]
        wall = []
        for label, spec in specs.items():
            for step, _secs in sorted(points[label].items()):
                folder = str(self.work / label) if step == spec.train.max_train_steps else \
                    self.export_at(label, spec, step)
                mine = plan_runs([(f"{label}@{step}", folder)], [int(ev["wallclock_steps"])], [], [],
                                 ev["guidance_scale"])
                mine = [r for r in mine if can_sample(r)] or plan_runs([(f"{label}@{step}", folder)], [1], [], [],
                                                                       ev["guidance_scale"])
                wall += mine[:1]
        check_runs(runs + wall)
        n = int(ev["num_images"])
        extractor = EXTRACTORS[ev["features"]]()
        ref_images = load_reference(ev["reference"], ev["resolution"] or 32)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        teacher_samples = teacher_images(self.teacher, make_prompts(n, None), list(range(n)), reference.steps,
                                         reference.scheduler, gs, ev["resolution"], int(ev["batch_size"]), device,
                                         cache_dir=self.work / "teacher_reference")
        by_steps = evaluate(runs, ref_images, extractor, n, self.out / "steps", resolution=ev["resolution"],
                            batch_size=int(ev["batch_size"]), device=device, teacher_reference=reference,
                            teacher_samples=teacher_samples)
        by_time = evaluate(wall, ref_images, extractor, n, self.out / "wallclock", resolution=ev["resolution"],
                           batch_size=int(ev["batch_size"]), device=device, teacher_reference=reference,
                           teacher_samples=teacher_samples)
        return self.report(specs, points, by_steps, by_time, gs)

    # ---- report ------------------------------------------------------------------------------
    def report(self, specs, points, by_steps, by_time, gs) -> dict:
        from dataclasses import asdict

        from .eval.report import plot_distance

        time_rows = []
        for r in by_time:
            label, step = r.label.rsplit("@", 1)
            secs = points[label][int(step)] + self.record["runs"][label]["data_seconds"]
            time_rows.append({**asdict(r), "label": label, "train_step": int(step), "seconds": round(secs, 1)})
        plot_distance(by_steps, self.out / "quality_vs_steps.png")
        plot_distance(time_rows, self.out / "quality_vs_time.png", x="seconds",
                      xlabel="training wall-clock, s (data generation included)")
        ev, d = self.ev, self.distill
        lines = ["# fewstep compare", "",
                 f"Teacher `{self.spec['distill'].get('pretrained_teacher_model')}`; every run trains {d['max_train_steps']} optimizer steps of batch "
                 f"{d['train_batch_size']} on the same data. {ev['num_images']} images per row, the same prompts and "
                 f"seeds for every row, guidance {gs:g} for the teacher's samplers. Distances are Fréchet distances "
                 f"on `{ev['features']}` features (lower is better): **real** to the `{ev['reference']}` reference "
                 f"images, **teacher** to the teacher's own {ev['teacher_reference_steps']}-step "
                 f"{ev['teacher_reference_scheduler']} samples of the same prompts and seeds.", "",
                 "## Quality vs sampling steps (real / teacher)", ""]
        steps = sorted({r.steps for r in by_steps if r.scheduler != ev["teacher_reference_scheduler"]
                        or r.steps != ev["teacher_reference_steps"]})
        lines.append("| run | sampler | " + " | ".join(f"{s} step{'s' if s > 1 else ''}" for s in steps) + " |")
        lines.append("|---|---|" + "---|" * len(steps))
        rows: dict[tuple, dict] = {}
        for r in by_steps:
            rows.setdefault((r.label, r.scheduler), {})[r.steps] = r
        for (label, sched), cells in rows.items():
            vals = [f"{cells[s].frechet_distance:.1f} / {cells[s].fd_teacher:.1f}" if s in cells else "–"
                    for s in steps]
            if any(v != "–" for v in vals):  # (the reference row has only its own step count)
                lines.append(f"| {label} | {sched} | " + " | ".join(vals) + " |")
        ref = next((r for r in by_steps if r.label == "teacher" and r.scheduler == ev["teacher_reference_scheduler"]
                    and r.steps == ev["teacher_reference_steps"]), None)
        if ref:
            lines += ["", f"The teacher's {ref.steps}-step {ref.scheduler} itself: real {ref.frechet_distance:.1f}."]
        lines += ["", "![quality vs steps](quality_vs_steps.png)", "", "## Quality vs training wall-clock", "",
                  f"Each run's checkpoints at {ev['wallclock_steps']} sampling steps (a student trained for one step "
                  "count: at that count). Seconds are those of the training loop (steps and data loading; not "
                  "validation, saving or evaluation), plus the teacher data generation where a run needs it.", "",
                  "| run | method | step | seconds | sampling steps | real | teacher |", "|---|---|---|---|---|---|---|"]
        for t in time_rows:
            lines.append(f"| {t['label']} | {self.record['runs'][t['label']]['method']} | {t['train_step']} | "
                         f"{t['seconds']} | {t['steps']} | {t['frechet_distance']:.1f} | {t['fd_teacher']:.1f} |")
        lines += ["", "![quality vs wall-clock](quality_vs_time.png)", "", "## Runs", ""]
        for label, info in self.record["runs"].items():
            lines.append(f"- **{label}**: `--method {info['method']}`" + (f" `--preset {info['preset']}`" if info["preset"]
                                                                         else "")
                         + "".join(f" `--{k} {v}`" for k, v in info["keys"].items() if k not in ("method", "preset"))
                         + f"; training loop {info['train_seconds']} s"
                         + (f", teacher data {info['data_seconds']} s" if info["data_seconds"] else "") + ".")
        lines += ["", "Per-row details (digit accuracy, seconds per image): [steps/report.md](steps/report.md), "
                  "[wallclock/report.md](wallclock/report.md)."]
        (self.out / "compare.md").write_text("\n".join(lines) + "\n")
        data = {"spec": {"distill": self.spec["distill"], "eval": ev,
                         "runs": {k: {"keys": v[0], "teacher_data": v[1]} for k, v in self.spec["runs"].items()}},
                "runs": self.record["runs"], "quality_vs_steps": [asdict(r) for r in by_steps],
                "quality_vs_time": time_rows}
        (self.out / "compare.json").write_text(json.dumps(data, indent=2) + "\n")
        return data


def cmd_compare(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fewstep compare", description=(
        "Distil one teacher on the same data at the same budget with several methods or presets (a YAML spec: "
        "distill / runs / eval; see benchmarks/quality_mnist/compare.yaml), then write one report: quality vs "
        "sampling steps (distance to real data and to the teacher's many-step samples, next to the teacher's "
        "DPM-Solver++ / Euler at the same steps) and quality vs training wall-clock, with plots. Rerunning the "
        "same command continues where it stopped."))
    p.add_argument("--spec", required=True, help="the comparison's YAML file")
    p.add_argument("--out", default="fewstep-compare", help="report folder (compare.md, compare.json, plots)")
    p.add_argument("--work", default=None, help="students, checkpoints and data (default: OUT/work)")
    p.add_argument("--max_train_steps", type=int, default=None, help="override the shared budget")
    p.add_argument("--train_batch_size", type=int, default=None, help="override the shared batch size")
    p.add_argument("--num_images", type=int, default=None)
    p.add_argument("--eval_points", type=int, default=None)
    p.add_argument("--runs", nargs="+", default=None, help="only these runs of the spec")
    a = p.parse_args(argv)
    spec = load_spec(a.spec, {"max_train_steps": a.max_train_steps, "train_batch_size": a.train_batch_size,
                              "num_images": a.num_images, "eval_points": a.eval_points, "runs": a.runs})
    out = Path(a.out)
    try:
        data = Comparison(spec, out, Path(a.work) if a.work else out / "work").run()
    except KeyboardInterrupt:
        print("fewstep compare: stopped; run the same command again to continue", flush=True)
        return 130
    print((out / "compare.md").read_text())
    print(f"report: {out / 'compare.md'} ({len(data['quality_vs_steps'])} rows vs steps, "
          f"{len(data['quality_vs_time'])} vs wall-clock)")
    return 0
