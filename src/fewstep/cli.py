"""Command line: sub-commands parse, validate and dispatch; the work lives elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import ALIASES, ConfigError, TrainConfig, describe, load_yaml, parse_cli_pairs, resolve

USAGE = """usage: fewstep <command> [options]

commands:
  demo       distil the bundled MNIST teacher and report quality vs steps (no arguments needed)
  distill    distil a teacher into a few-step student   (fewstep distill --help)
  train-teacher  train a small text-to-image teacher from scratch (same options as distill)
  sample     generate images with a trained student     (fewstep sample --help)
  export     merge a LoRA student into a full pipeline   (fewstep export --fuse ...)
  eval       quality vs steps of teachers and students  (fewstep eval --help)
  cache      precompute VAE latents and text embeddings  (fewstep cache --help)
  generate   teacher images + metadata.csv for --method direct (fewstep generate --help)
  methods    list the distillation methods
"""


def method_configs():
    """The registered methods by name (what config resolution binds a run's keys to)."""
    from .methods import REGISTRY

    return dict(REGISTRY)


def parse_run(argv: list[str]):
    """YAML (--config) first, command-line flags on top; returns a validated RunSpec."""
    import dataclasses

    methods = method_configs()
    bool_keys = {f.name for c in [TrainConfig, *(m.Config for m in methods.values())] for f in dataclasses.fields(c)
                 if f.type in ("bool", bool)}
    bool_keys |= {a for a, k in ALIASES.items() if k in bool_keys}
    raw: dict = {}
    argv = [x for a in argv for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file")
        raw.update(load_yaml(argv[i + 1]))
        argv = argv[:i] + argv[i + 2:]
    raw.update(parse_cli_pairs(argv, bool_keys))
    spec = resolve(raw, methods)
    if spec.method_cls.needs_teacher and not spec.train.pretrained_teacher_model:
        raise ConfigError("--pretrained_teacher_model is required (a diffusers folder or hub id)")
    return spec


def dry_run(spec) -> int:
    """Everything but training: configs of every model part, one data sample, disk space."""
    import yaml

    from .data import build_dataset
    from .models.bundle import free_disk_bytes

    cfg = spec.train
    if cfg.cache_dir:
        from .data.cache import check_cache

        check_cache(cfg)  # the cache was made for this teacher and transform
    light = spec.method_cls.preflight(cfg, spec.method)  # the teacher's configs, checked against the settings
    if light is not None:
        print(f"teacher: {light.describe()}")
    from .training.memory import report

    print(report(spec))  # every network the method will hold, built on the meta device
    import torch

    from .training.speed import check_compile

    check_compile(cfg, "cuda" if torch.cuda.is_available() else "cpu")
    ds = build_dataset(cfg)

    sample = next(iter(ds)) if isinstance(ds, torch.utils.data.IterableDataset) else ds[0]
    if "_bad" in sample:
        raise ConfigError(f"the first data sample is unusable ({sample['_bad']}): {sample['_where']}")
    if hasattr(ds, "__len__") and len(ds) < cfg.train_batch_size:
        # (full batches only: a data set smaller than one batch would yield no step at all)
        raise ConfigError(f"the data has {len(ds)} samples, fewer than one batch (--train_batch_size "
                          f"{cfg.train_batch_size} per process): lower --train_batch_size or add data")
    free = free_disk_bytes(cfg.output_dir)
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    first = sample["pixel_values"] if "pixel_values" in sample else sample["cached_moments"]
    print(f"data: {type(ds).__name__}, first sample {tuple(first.shape)} "
          f"caption {sample['caption'][:60]!r}" + (f", {len(ds)} samples" if hasattr(ds, "__len__") else ""))
    print(f"free disk at {cfg.output_dir}: {free / 2**30:.1f} GiB")
    if free < 2**30:
        print("warning: less than 1 GiB free for checkpoints and the exported student", file=sys.stderr)
    print("dry run OK: nothing was trained")
    return 0


def cmd_distill(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        from .methods import REGISTRY

        print("usage: fewstep distill [--config run.yaml] --method NAME --pretrained_teacher_model DIR "
              "--output_dir OUT [--key value ...]\n\ncommon options (default, help):")
        print(describe(TrainConfig))
        for name, cls in REGISTRY.items():
            print(f"\n--method {name} options:")
            print(describe(cls.Config))
        print("\naliases: " + ", ".join(f"--{a} = --{k}" for a, k in ALIASES.items()))
        return 0
    spec = parse_run(argv)
    if spec.train.dry_run:
        return dry_run(spec)
    from .training.trainer import Trainer

    out = Trainer(spec).train()
    if out is not None:
        print(f"student saved in {out}")
    return 0


def cmd_train_teacher(argv: list[str]) -> int:
    """`fewstep train-teacher ...` = `fewstep distill --method teacher ...`."""
    if "--method" in argv:
        raise ConfigError("train-teacher always uses --method teacher; drop --method")
    if any(a.split("=")[0] == "--cache_dir" for a in argv):
        raise ConfigError("train-teacher trains the VAE on pixels: give it images (--train_data_dir, ...), not --cache_dir")
    return cmd_distill(["--method", "teacher", *argv])


def cmd_sample(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fewstep sample", description="Generate images with a fewstep student.")
    p.add_argument("--model", required=True, help="folder written by fewstep distill (a diffusers pipeline)")
    p.add_argument("--prompt", required=True, action="append", help="repeat for several images")
    p.add_argument("--num_inference_steps", type=int, default=None)
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--scheduler", default=None, help="lcm, ddim, dpm++, euler (default: the folder's own)")
    p.add_argument("--output", default="sample.png", help="PNG path; several prompts make a row")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    import torch
    from PIL import Image

    from .diffusion.sampling import check_scheduler, make_scheduler, sample_images
    from .models.bundle import load_bundle
    from .training.trainer import image_grid

    if a.scheduler:
        check_scheduler(a.scheduler, "--scheduler")
    bundle = load_bundle(a.model)
    hints_path = Path(a.model) / "fewstep_sampling.json"
    hints = json.loads(hints_path.read_text()) if hints_path.is_file() else {}
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle.to(device)
    if a.scheduler:
        sched = make_scheduler(a.scheduler, bundle.scheduler_config)
    else:
        import diffusers

        cls = getattr(diffusers, bundle.scheduler_config.get("_class_name", "DDPMScheduler"))
        sched = cls.from_config(bundle.scheduler_config)
    steps = a.num_inference_steps or hints.get("num_inference_steps", 4)
    gs = a.guidance_scale if a.guidance_scale is not None else hints.get("guidance_scale", 1.0)
    res = a.resolution or bundle.default_resolution
    # Training timesteps the scheduler's own grid cannot express (a one-step generator at t = 399)
    ts = hints.get("timesteps")
    if a.scheduler or (ts and a.num_inference_steps and a.num_inference_steps != len(ts)):
        ts = None
    # Pipelines that do not hand their generator to the scheduler (SD3) re-noise multistep LCM samples from
    # torch's global RNG: seed it too, so a run is repeatable (and equals the pipeline after the same seed).
    torch.manual_seed(a.seed)
    imgs = sample_images(bundle, bundle.denoiser, sched, a.prompt, [a.seed + i for i in range(len(a.prompt))],
                         steps, gs, res, res, timesteps=ts)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image_grid([imgs])).save(a.output)
    print(f"{a.output}: {len(a.prompt)} image(s), {steps} steps, guidance {gs}, {type(sched).__name__}")
    return 0


def cmd_cache(argv: list[str]) -> int:
    """`fewstep cache`: the data and teacher options of distill; --output_dir is the cache folder."""
    if "-h" in argv or "--help" in argv:
        print("usage: fewstep cache --pretrained_teacher_model DIR (--train_data_dir D | "
              "--train_shards_path_or_url S | --file_list F | --dataset_name N) --output_dir CACHE\n"
              "  [--resolution R --center_crop --random_flip --interpolation_type I --mixed_precision fp16\n"
              "   --train_batch_size B --dataloader_num_workers W --validation_prompts 'p1|p2' ...]\n\n"
              "Writes VAE posterior moments and text embeddings; train with `fewstep distill --cache_dir CACHE`\n"
              "and the same --pretrained_teacher_model / --resolution / transform options. Several processes\n"
              "(accelerate launch, torchrun) split the data and write in parallel.")
        return 0
    spec = parse_run(argv)
    cfg = spec.train
    if cfg.cache_dir:
        raise ConfigError("fewstep cache writes a cache: give it --output_dir, not --cache_dir")
    if cfg.data_resampling:
        raise ConfigError("--data_resampling makes an endless stream, which cannot be cached; drop it")
    from .caching import write_cache

    out = write_cache(spec)
    if out is not None:
        print(f"cache written to {out}; train with --cache_dir {out}")
    return 0


def cmd_methods(argv: list[str]) -> int:
    from .methods import REGISTRY

    for name, cls in REGISTRY.items():
        print(f"{name:10s} {(cls.__module__ and sys.modules[cls.__module__].__doc__ or '').strip().splitlines()[0]}")
    return 0


def cmd_eval(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fewstep eval", description=(
        "Quality vs sampling steps: generate the same prompts and seeds with every model, scheduler and step "
        "count; Fréchet distance to reference images, digit accuracy, seconds per image; write a report."))
    p.add_argument("--model", action="append", required=True,
                   help="LABEL=FOLDER (repeat; LoRA folders too). LCMScheduler folders are students; folders whose "
                        "fewstep_sampling.json names a sampler (direct) run with it at their steps; others are teachers")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8], help="students and baselines")
    p.add_argument("--teacher_steps", type=int, nargs="+", default=[25, 50], help="teachers with DDIM")
    p.add_argument("--baselines", nargs="*", default=["ddim", "dpm++"],
                   help="teacher schedulers at --steps: ddim (trailing spacing), ddim-leading (the SD default), "
                        "dpm++, euler")
    p.add_argument("--num_images", type=int, default=1000)
    p.add_argument("--batch_size", type=int, default=250)
    p.add_argument("--guidance_scale", type=float, default=None, help="default: each folder's recommendation")
    p.add_argument("--features", default="digits", choices=["digits", "inception", "random"])
    p.add_argument("--inception_weights", default=None, help="local FID Inception weights (offline)")
    p.add_argument("--clip_model", default=None, help="local CLIP model folder: adds the CLIP score")
    p.add_argument("--reference", default="mnist-heldout",
                   help="mnist-heldout (the 1,000 bundled held-out digits), an MNIST IDX folder, or an image folder")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (default: the ten digits)")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--out", default="fewstep-eval")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    from .diffusion.sampling import check_scheduler
    from .eval.metrics import EXTRACTORS
    from .eval.run import evaluate, load_reference, plan_runs

    for b in a.baselines:  # before any image is generated
        check_scheduler(b, "--baselines")
    if a.num_images < 1 or a.batch_size < 1:
        raise ConfigError("--num_images and --batch_size must be >= 1")
    if a.prompts and not Path(a.prompts).is_file():
        raise ConfigError(f"--prompts {a.prompts}: no such file (give a text file, one prompt per line)")

    models = []
    for m in a.model:
        label, eq, path = m.partition("=")
        models.append((label, path) if eq else (Path(m).name, m))
    runs = plan_runs(models, a.steps, a.teacher_steps, a.baselines, a.guidance_scale)
    prompts = None
    if a.prompts:
        prompts = [ln.strip() for ln in Path(a.prompts).read_text().splitlines() if ln.strip()]
        if not prompts:
            raise ConfigError(f"--prompts {a.prompts}: the file holds no prompt (one per line)")
    extractor = EXTRACTORS[a.features](a.inception_weights) if a.features == "inception" else EXTRACTORS[a.features]()
    clip = None
    if a.clip_model:
        from .eval.metrics import ClipScore

        clip = ClipScore(a.clip_model)
    res = evaluate(runs, load_reference(a.reference, a.resolution or 32), extractor, a.num_images, Path(a.out),
                   prompts, a.resolution, a.batch_size, a.device, clip=clip)
    from .eval.report import markdown_table

    print(markdown_table(res))
    print(f"report: {Path(a.out) / 'report.md'}")
    return 0


def cmd_export(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fewstep export", description=(
        "Write a LoRA student (fewstep distill output with LoRA) as a full diffusers pipeline folder, "
        "the LoRA merged into the UNet."))
    p.add_argument("--model", required=True, help="the LoRA output folder of fewstep distill")
    p.add_argument("--fuse", action="store_true", help="merge the LoRA into the UNet (required today)")
    p.add_argument("--output_dir", required=True)
    a = p.parse_args(argv)
    from .models.bundle import load_bundle
    from .models.lora import folder_scheduler, is_lora_folder

    if not is_lora_folder(a.model):
        raise ConfigError(f"--model {a.model} is not a fewstep LoRA folder (no fewstep_lora.json / "
                          "pytorch_lora_weights.safetensors); full-model students are pipeline folders already")
    if not a.fuse:
        raise ConfigError("pass --fuse: export writes the base model with the LoRA merged in")
    from .export import export_pipeline

    bundle = load_bundle(a.model)
    # The sampler the student was trained for (LCM for LCM-LoRA, trailing DDIM for direct), not always LCM
    export_pipeline(bundle, bundle.denoiser, folder_scheduler(a.model, bundle), Path(a.output_dir))
    hints = Path(a.model) / "fewstep_sampling.json"
    if hints.is_file():
        (Path(a.output_dir) / "fewstep_sampling.json").write_text(hints.read_text())
    print(f"fused pipeline written to {a.output_dir}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fewstep demo", description=(
        "Distil the bundled MNIST teacher with LCD, evaluate teacher vs student at 1/2/4 steps, write a report."))
    p.add_argument("--output_dir", default="fewstep-demo")
    p.add_argument("--max_train_steps", type=int, default=None, help="default: the embedded 250")
    p.add_argument("--num_images", type=int, default=400, help="images per evaluated row")
    a = p.parse_args(argv)
    from .demo import run_demo

    s = run_demo(a.output_dir, a.max_train_steps, a.num_images)
    print(f"\nfewstep demo: distilled in {s['train_seconds']} s, {s['total_seconds']} s in all")
    print(f"Fréchet distance to 1,000 held-out digits (lower is better), {a.num_images} images per row, "
          f"guidance {s['guidance_scale']:g}:")
    print(f"  teacher, DDIM 25 steps           {s['teacher_ddim_25']:8.2f}")
    for n in (1, 2, 4):
        print(f"  {n} step(s): teacher DDIM {s[f'teacher_ddim_{n}']:8.2f}   LCD student {s[f'student_{n}']:8.2f}"
              f"   ({s[f'teacher_ddim_{n}'] / max(s[f'student_{n}'], 1e-9):.2f}x better)")
    print(f"report: {s['report']}")
    return 0


def cmd_generate(argv: list[str]) -> int:
    from .generate import cmd_generate as run

    return run(argv)


COMMANDS = {"demo": cmd_demo, "generate": cmd_generate, "eval": cmd_eval, "distill": cmd_distill, "export": cmd_export,
            "train-teacher": cmd_train_teacher, "sample": cmd_sample, "cache": cmd_cache, "methods": cmd_methods}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        import difflib

        hint = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        print(f"fewstep: unknown command {cmd!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""), file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    from .training.checkpoint import CheckpointError

    try:
        return COMMANDS[cmd](rest)
    except ConfigError as e:
        print(f"fewstep {cmd}: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"fewstep {cmd}: error: {e}", file=sys.stderr)
        return 1
