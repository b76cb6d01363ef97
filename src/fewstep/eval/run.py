"""`fewstep eval`: quality versus sampling steps, for teachers, baselines and students alike.

Every run (a model × a scheduler × a step count) generates the same N prompts with the same seeds
through the sampler users run (:func:`fewstep.diffusion.sampling.sample_images`), then is scored with
a Fréchet distance to a reference image set under a pluggable feature extractor, optionally the
distance to the teacher's own many-step samples of the same prompts and seeds (:mod:`.teacher`), the
prompt fidelity (for digits: the shipped classifier's accuracy on the digit asked for), and seconds per
image. Every planned run is checked before the first image is generated, and ``results.json`` is
rewritten after each run, so an interrupted evaluation keeps the rows it finished.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ConfigError


@dataclass
class EvalRun:
    label: str  # model label as given on the command line
    model: str  # diffusers folder
    scheduler: str  # lcm, ddim, dpm++, ...
    steps: int
    guidance_scale: float


@dataclass
class RunResult:
    label: str
    scheduler: str
    steps: int
    guidance_scale: float
    frechet_distance: float
    digit_accuracy: float | None
    seconds_per_image: float
    clip_score: float | None = None
    fd_teacher: float | None = None  # Fréchet distance to the teacher's many-step samples (same prompts, seeds)


def sampling_hints(model: str) -> dict:
    """The folder's fewstep_sampling.json (steps, guidance, timesteps, sampler), or {}."""
    p = Path(model) / "fewstep_sampling.json"
    return json.loads(p.read_text()) if p.is_file() else {}


def _scheduler_class(model: str) -> str:
    from ..models.lora import is_lora_folder

    p = Path(model) / "scheduler" / "scheduler_config.json"
    if not p.is_file() and is_lora_folder(model):
        return "LCMScheduler"  # what load_bundle samples a LoRA folder without its own scheduler with
    return json.loads(p.read_text()).get("_class_name", "") if p.is_file() else ""


def plan_runs(models: list[tuple[str, str]], steps: list[int], teacher_steps: list[int], baselines: list[str],
              guidance_scale: float | None = None) -> list[EvalRun]:
    """Students (LCMScheduler folders) at ``steps``; students whose fewstep_sampling.json names a
    ``sampler`` (direct distillation) with it at their trained step count; other models (teachers)
    with DDIM at ``teacher_steps`` and with each baseline scheduler at ``steps``."""
    from ..models.lora import is_lora_folder

    runs = []
    for label, path in models:
        # LoRA folders load as `fewstep sample` loads them (load_bundle: the base with the LoRA fused in)
        if not ((Path(path) / "model_index.json").is_file() or is_lora_folder(path)):
            raise ConfigError(f"--model {label}={path}: neither a diffusers pipeline folder (no model_index.json) "
                              "nor a fewstep LoRA folder (no fewstep_lora.json / pytorch_lora_weights.safetensors)")
        gs = guidance_scale if guidance_scale is not None else sampling_hints(path).get("guidance_scale", 1.0)
        hints = sampling_hints(path)
        if hints.get("sampler"):  # a student trained for one sampler at K steps (direct distillation)
            runs.append(EvalRun(label, path, hints["sampler"], int(hints["num_inference_steps"]), gs))
        elif "LCM" in str(_scheduler_class(path)):  # LCMScheduler, or FlowMatchLCMScheduler (flow teachers)
            # only the step counts the student is trained for (its LCMScheduler refuses more than a K-step
            # DMD2 generator's K, and a one-step generator has seen no other timestep)
            lo, hi = hints.get("valid_steps", (1, max(steps)))
            mine = [n for n in steps if lo <= n <= hi]
            if not mine:
                raise ConfigError(f"--model {label}={path} is trained for {lo}–{hi} steps; none of --steps {steps}")
            runs += [EvalRun(label, path, "lcm", n, gs) for n in mine]
        else:
            runs += [EvalRun(label, path, "ddim", n, gs) for n in teacher_steps]
            runs += [EvalRun(label, path, b, n, gs) for b in baselines for n in steps]
    return runs


def run_scheduler(run: EvalRun, scheduler_config: dict):
    """(scheduler, explicit timesteps or None) a run samples with: the folder's LCMScheduler for ``lcm``
    (with the training timesteps of fewstep_sampling.json when they match the step count), else a
    scheduler by short name over the folder's config."""
    from ..diffusion.sampling import make_scheduler

    ts = sampling_hints(run.model).get("timesteps") if run.scheduler == "lcm" else None
    ts = ts if ts and len(ts) == run.steps else None  # (one-step DMD2 at t = 399: the grid cannot express it)
    if run.scheduler == "lcm" and "LCM" in str(scheduler_config.get("_class_name", "")):
        import diffusers

        # the student's own LCM scheduler (LCMScheduler, or FlowMatchLCMScheduler on a flow teacher)
        return getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config), ts
    return make_scheduler(run.scheduler, scheduler_config), ts


def check_steps(scheduler, steps: int, timesteps, what: str, trained_steps=None, bundle=None,
                resolution: int | None = None) -> None:
    """Refuse a step count the scheduler cannot run (diffusers would raise inside the sampling loop).
    ``bundle`` (configs are enough): the grid is set as sampling sets it, with the family's
    ``set_timesteps`` arguments (a resolution-dependent ``mu``, the pipeline's sigmas) at ``resolution``
    (default: the teacher's), without which a dynamically shifted scheduler always refuses."""
    try:
        if bundle is not None:
            res = resolution or bundle.default_resolution
            kw = bundle.timestep_kwargs(res, res, timesteps, num_inference_steps=steps, scheduler=scheduler)
            if "timesteps" in kw or "sigmas" in kw:
                scheduler.set_timesteps(device="cpu", **kw)
            else:
                scheduler.set_timesteps(steps, device="cpu", **kw)
        elif timesteps is not None:
            scheduler.set_timesteps(timesteps=list(timesteps), device="cpu")
        else:
            scheduler.set_timesteps(steps, device="cpu")
    except (ValueError, TypeError, AssertionError) as e:
        hint = f"; it was trained for {trained_steps} step(s)" if trained_steps else ""
        raise ConfigError(f"{what}: {type(scheduler).__name__} cannot sample {steps} step(s) ({e}){hint}") from None


def can_sample(run: EvalRun) -> bool:
    """Whether ``run``'s scheduler accepts its step count (see :func:`check_runs`)."""
    try:
        check_runs([run])
    except ConfigError:
        return False
    return True


def check_runs(runs: list[EvalRun]) -> None:
    """Every planned run's scheduler accepts its step count, checked on the folders' configs before any
    model loads; all the runs that cannot be sampled are named in one message."""
    from ..models.bundle import load_bundle

    configs: dict[str, object] = {}
    problems = []
    for run in runs:
        if run.model not in configs:
            configs[run.model] = load_bundle(run.model, weights=False)
        sched, ts = run_scheduler(run, configs[run.model].scheduler_config)
        try:
            check_steps(sched, run.steps, ts, f"--model {run.label}={run.model} ({run.scheduler})",
                        sampling_hints(run.model).get("num_inference_steps"), bundle=configs[run.model])
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n  ".join([f"{len(problems)} planned run(s) cannot be sampled; choose --steps the "
                                        "models support:", *problems]))


def make_prompts(n: int, prompts: list[str] | None) -> list[str]:
    from .mnist import caption_for

    base = prompts or [caption_for(d) for d in range(10)]
    return [base[i % len(base)] for i in range(n)]


def generate(run: EvalRun, prompts: list[str], seeds: list[int], resolution: int | None, batch_size: int,
             device: str, bundles: dict, progress=None) -> tuple[torch.Tensor, float]:
    """Images in [0, 1] for every (prompt, seed), and seconds per image."""
    from ..diffusion.sampling import sample_images
    from ..models.bundle import load_bundle

    if run.model not in bundles:
        bundles[run.model] = load_bundle(run.model).to(device)
    b = bundles[run.model]
    res = resolution or b.default_resolution
    # A student's folder carries its own LCMScheduler config (original steps, scaling).
    sched, ts = run_scheduler(run, b.scheduler_config)
    out = []
    torch.manual_seed(0)  # stochastic steps that draw from the global RNG (SD3 pipelines) repeat exactly
    t0 = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        out.append(sample_images(b, b.denoiser, sched, prompts[i:i + batch_size], seeds[i:i + batch_size], run.steps,
                                 run.guidance_scale, res, res, timesteps=ts).cpu())
        if progress is not None:
            progress.update(len(out[-1]))
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return torch.cat(out), (time.perf_counter() - t0) / len(prompts)


def evaluate(runs: list[EvalRun], reference: torch.Tensor, extractor, n: int, out_dir: Path,
             prompts: list[str] | None = None, resolution: int | None = None, batch_size: int = 250,
             device: str | None = None, grid_columns: int = 10, clip=None, teacher_reference: EvalRun | None = None,
             teacher_samples: torch.Tensor | None = None) -> list[RunResult]:
    """Generate, score, and write the report folder; returns every number.

    ``teacher_reference``: a teacher run (e.g. DDIM at 50 steps) whose images for the same prompts and
    seeds every run is also compared with (``fd_teacher``); ``teacher_samples``: those images, when the
    caller has them already. ``results.json`` and ``report.md`` are rewritten after every run."""
    from tqdm.auto import tqdm

    from .metrics import digit_accuracy, feature_stats, frechet_distance
    from .mnist import label_from_prompt
    from .report import write_partial, write_report

    check_runs(runs + ([teacher_reference] if teacher_reference and teacher_samples is None else []))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(n, prompts)
    seeds = list(range(n))
    labels = [label_from_prompt(p) for p in prompts]
    meta = {"num_images": n, "extractor": extractor.name, "clip_model": getattr(clip, "path", None),
            "reference_images": len(reference), "device": device,
            "teacher_reference": None if teacher_reference is None else
            f"{teacher_reference.label} {teacher_reference.scheduler} {teacher_reference.steps} steps, "
            f"guidance {teacher_reference.guidance_scale:g}"}
    with torch.no_grad():
        ref_stats = feature_stats(_features(extractor, reference, batch_size))
    results, grids = [], []
    bundles: dict = {}
    def same(r: EvalRun) -> bool:  # this row is the teacher reference itself
        t = teacher_reference
        return t is not None and (r.model, r.scheduler, r.steps, r.guidance_scale) == (
            t.model, t.scheduler, t.steps, t.guidance_scale)

    extra = teacher_reference is not None and teacher_samples is None and not any(same(r) for r in runs)
    bar = tqdm(total=n * (len(runs) + extra), desc="generating", unit="img")
    ref_spi = float("nan")
    if teacher_reference is not None and teacher_samples is None:
        # Generated first, so every row gets its distance as soon as it is done.
        src = next((r for r in runs if same(r)), teacher_reference)
        teacher_samples, ref_spi = generate(src, prompts, seeds, resolution, batch_size, device, bundles, bar)
    teacher_stats = None
    if teacher_samples is not None:  # (what eval.teacher.fd_to_teacher computes, with the stats kept)
        if len(teacher_samples) != n:
            raise ValueError(f"{len(teacher_samples)} teacher samples for {n} prompts and seeds")
        with torch.no_grad():
            teacher_stats = feature_stats(_features(extractor, teacher_samples, batch_size))
    for run in runs:
        if same(run):  # the reference itself is one of the rows (its time is unknown when it came from outside)
            images, spi = teacher_samples, ref_spi
        else:
            images, spi = generate(run, prompts, seeds, resolution, batch_size, device, bundles, bar)
        with torch.no_grad():
            stats = feature_stats(_features(extractor, images, batch_size))
        fd = frechet_distance(*ref_stats, *stats)
        acc = None
        if all(lab is not None for lab in labels):
            acc = digit_accuracy(images, torch.tensor(labels))
        cs = clip(images, prompts) if clip is not None else None
        fdt = frechet_distance(*teacher_stats, *stats) if teacher_stats is not None else None
        results.append(RunResult(run.label, run.scheduler, run.steps, run.guidance_scale, fd, acc, spi, cs, fdt))
        grids.append((f"{run.label} {run.scheduler} {run.steps}", images[:grid_columns]))
        write_partial(out_dir, results, meta, total=len(runs))
    bar.close()
    write_report(out_dir, results, grids, meta=meta)
    return results


def load_reference(spec: str, resolution: int = 32) -> torch.Tensor:
    """Reference images in [0, 1]: the bundled held-out digits, an MNIST IDX folder, or an image folder."""
    from .mnist import IMAGES, load_eval_arrays

    if spec == "mnist-heldout":
        from .mnist import heldout_digits

        return heldout_digits()
    p = Path(spec)
    if (p / IMAGES).is_file():
        return load_eval_arrays(p)[0]
    if p.is_dir():
        import numpy as np
        from PIL import Image

        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        if not files:
            raise ConfigError(f"--reference {spec}: no images there")
        arrs = [np.asarray(Image.open(f).convert("RGB").resize((resolution, resolution), Image.BICUBIC))
                for f in files]
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 255
    raise ConfigError(f"--reference {spec}: not 'mnist-heldout', an MNIST folder or an image folder")


def _features(extractor, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([extractor(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])
