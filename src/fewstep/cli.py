"""Command line: sub-commands parse, validate and dispatch; the work lives elsewhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .config import ALIASES, ConfigError, TrainConfig, describe
from .runspec import method_configs, parse_run  # noqa: F401  (re-exported: tests and benchmarks import them here)

USAGE = """usage: fewstep <command> [options]

commands:
  demo       distil the bundled MNIST teacher and report quality vs steps (no arguments needed)
  distill    distil a teacher into a few-step student   (fewstep distill --help)
  train-teacher  train a small text-to-image teacher from scratch (same options as distill)
  sample     generate images with a trained student     (fewstep sample --help)
  export     merge a LoRA student into a full pipeline (--fuse), or export a checkpoint (--from_checkpoint)
  eval       quality vs steps of teachers and students  (fewstep eval --help)
  cache      precompute VAE latents and text embeddings  (fewstep cache --help)
  generate   teacher images + metadata.csv for --method direct (fewstep generate --help)
  compare    distil one teacher with several methods or presets, one report (fewstep compare --help)
  push       upload an exported student to the Hugging Face Hub (fewstep push OUT --hub_model_id ID)
  methods    list the distillation methods
  presets    list the presets (--preset NAME): settings of the reference recipes per method and family
"""


def dry_run(spec) -> int:
    """Everything but training: the run's own refusals (training/preflight.py), the configs of every model
    part, the first usable data sample, disk space."""
    import yaml

    from .models.bundle import free_disk_bytes
    from .training.preflight import check_run, check_teacher, wandb_reachable
    from .training.trainer import EpochSampler

    cfg = spec.train
    if cfg.cache_dir:
        from .data.cache import check_cache

        check_cache(cfg)  # the cache was made for this teacher and transform
    data = check_run(spec, order=lambda n, seed: iter(EpochSampler(n, seed)), dry=True)
    light = spec.method_cls.preflight(cfg, spec.method)  # the teacher's configs (no weights), checked
    check_teacher(spec, light)
    if light is not None:
        print(f"teacher: {light.describe()}")
    if cfg.fsdp:  # the bytes each rank will hold: the method's networks built on the meta device
        import os

        from .training.sharding import dry_run_report

        n = int(os.environ.get("WORLD_SIZE", "1"))
        try:
            print(dry_run_report(spec, light, sorted({n, 8})))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - the sizes are information; the run's own checks come next
            print(f"sharding: the networks could not be sized on the meta device ({type(e).__name__}: {e})")
    from .training.memory import report

    print(report(spec))  # every network the method will hold, built on the meta device
    ds, sample = data.dataset, data.sample
    free = free_disk_bytes(cfg.output_dir)
    print(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    if not sample:
        print("data: every shard is a pipe: command, so no sample was opened")
    else:
        first = sample["pixel_values"] if "pixel_values" in sample else sample["cached_moments"]
        skipped = (f" ({sum(data.skipped.values())} bad of the first {data.seen} read, which the run skips: "
                   + ", ".join(f"{n} {c}" for c, n in data.skipped.most_common()) + ")") if data.skipped else ""
        print(f"data: {type(ds).__name__}, first sample {tuple(first.shape)} "
              f"caption {sample['caption'][:60]!r}" + (f", {len(ds)} samples" if hasattr(ds, "__len__") else "")
              + skipped)
    for cmd in data.pipes:
        print(f"--dry_run does not run pipe: shards; training would run: {cmd}")
    for line in spec.family_report():
        print(line)
    print(f"free disk at {cfg.output_dir}: {free / 2**30:.1f} GiB")
    if free < 2**30:
        print("warning: less than 1 GiB free for checkpoints and the exported student", file=sys.stderr)
    if cfg.report_to in ("wandb", "all"):
        import os

        online = os.environ.get("WANDB_MODE") or ("online" if wandb_reachable() else "offline (no network)")
        print(f"wandb: {online}")
    if cfg.push_to_hub:
        print(f"after the run: upload the student to the hub repo {hub_repo(cfg)}")
    print("dry run OK: nothing was trained")
    return 0


def hub_repo(cfg) -> str:
    """diffusers' default: the repo is named after --output_dir."""
    return cfg.hub_model_id or Path(cfg.output_dir).resolve().name


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
        from .config import REFUSED, TRANSLATED

        print("DiffSynth-Studio's flags translated by value: --height/--width (= --resolution), --task, "
              + ", ".join(f"--{k}" for k in TRANSLATED) + "; refused with what to use instead: "
              + ", ".join(f"--{k}" for k in REFUSED))
        print("presets: `fewstep presets`; --preset NAME under --config and the flags")
        return 0
    spec = parse_run(argv)
    if spec.train.dry_run:
        return dry_run(spec)
    from .training.trainer import Trainer

    trainer = Trainer(spec)
    try:
        out = trainer.train()
    finally:
        trainer.release()  # (the networks before the process group: a gloo teardown could hang otherwise)
    if trainer.stopped_by:  # stopped by SIGTERM / SIGINT after saving: 128 + N, as a shell reports it
        return 128 + trainer.stopped_by
    if out is not None:
        print(f"student saved in {out}")
        if spec.train.push_to_hub:
            return push(out, hub_repo(spec.train), spec.train.hub_token)
    return 0


def push(folder, repo_id: str, token: str | None, private: bool = False) -> int:
    """Upload ``folder``'s export; on failure say so, keep the folder, exit :data:`hub.EXIT_PUSH_FAILED`."""
    from .hub import EXIT_PUSH_FAILED, HubError, push_folder, push_later_message

    try:
        url = push_folder(folder, repo_id, token, private)
    except HubError as e:
        print(f"fewstep: {push_later_message(folder, repo_id, str(e))}", file=sys.stderr)
        return EXIT_PUSH_FAILED
    print(f"uploaded {folder} to {url}")
    return 0


def cmd_push(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fewstep push", description=(
        "Upload the exported student of a finished run (its --output_dir) and its card to the Hugging Face Hub: "
        "create_repo + one upload_folder commit. Checkpoints, logs and validation grids stay local. Exit status "
        "3 when the hub cannot be reached or refuses (the folder is not changed)."))
    p.add_argument("folder", help="the --output_dir of fewstep distill")
    p.add_argument("--hub_model_id", default=None, help="repo id NAME or OWNER/NAME (default: the folder's name)")
    p.add_argument("--hub_token", default=None, help="default: the saved login (hf auth login) or HF_TOKEN")
    p.add_argument("--private", action="store_true")
    a = p.parse_args(argv)
    from .hub import check_export

    check_export(a.folder)
    return push(a.folder, a.hub_model_id or Path(a.folder).resolve().name, a.hub_token, a.private)


def cmd_train_teacher(argv: list[str]) -> int:
    """`fewstep train-teacher ...` = `fewstep distill --method teacher ...`."""
    if "--method" in argv:
        raise ConfigError("train-teacher always uses --method teacher; drop --method")
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
    if a.num_inference_steps is not None and a.num_inference_steps < 1:
        raise ConfigError("--num_inference_steps must be >= 1")
    from .eval.run import check_steps

    # Everything checked on the folder's configs before any weight loads.
    configs = load_bundle(a.model, weights=False)
    hints_path = Path(a.model) / "fewstep_sampling.json"
    hints = json.loads(hints_path.read_text()) if hints_path.is_file() else {}
    if a.scheduler:
        sched = make_scheduler(a.scheduler, configs.scheduler_config)
    else:
        import diffusers

        cls = getattr(diffusers, configs.scheduler_config.get("_class_name", "DDPMScheduler"))
        sched = cls.from_config(configs.scheduler_config)
    steps = a.num_inference_steps or hints.get("num_inference_steps", 4)
    lo, hi = hints.get("valid_steps", (1, steps))
    if not a.scheduler and not lo <= steps <= hi:
        from .export import steps_phrase

        raise ConfigError(f"--num_inference_steps {steps}: {a.model} is trained for {steps_phrase((lo, hi))} "
                          f"(its fewstep_sampling.json); pick one of those, or another --scheduler to experiment")
    gs = a.guidance_scale if a.guidance_scale is not None else hints.get("guidance_scale", 1.0)
    # Training timesteps the scheduler's own grid cannot express (a one-step generator at t = 399)
    ts = hints.get("timesteps")
    if a.scheduler or (ts and a.num_inference_steps and a.num_inference_steps != len(ts)):
        ts = None
    factor = configs.pixel_multiple
    res = a.resolution or configs.default_resolution
    if res % factor:
        lo = res // factor * factor
        raise ConfigError(f"--resolution {res} is not a multiple of {factor} (the model's pixels per latent "
                          f"patch): use {lo or factor} or {lo + factor}")
    check_steps(sched, steps, ts, f"--model {a.model}", hints.get("num_inference_steps"), bundle=configs,
                resolution=res)
    bundle = load_bundle(a.model)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bundle.to(device)
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


def cmd_presets(argv: list[str]) -> int:
    """`fewstep presets [NAME]`: the presets with their family and source; with a name, its keys."""
    import yaml

    from .runspec import CONFIGS, list_presets, load_preset

    if argv and argv[0] not in ("-h", "--help"):
        pr = load_preset(argv[0])
        print(f"# {pr.name}: {pr.description}\n# family: {pr.family}; source: {pr.source}\n# file: {pr.path}")
        print(yaml.safe_dump(pr.keys, sort_keys=False), end="")
        return 0
    presets = list_presets()
    if not presets:
        print(f"no presets in {CONFIGS} (set FEWSTEP_CONFIGS to a folder of configs/<method>/<family>.yaml)")
        return 0
    print("usage: fewstep distill --preset NAME [flags override it] ...; fewstep presets NAME shows its keys\n")
    for pr in presets:
        print(f"{pr.name:18s} {pr.family or '-':6s} {pr.description}\n{'':25s} source: {pr.source}")
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
    p.add_argument("--teacher_reference", default=None, metavar="LABEL",
                   help="also the distance to this --model's own samples for the same prompts and seeds "
                        "(a teacher; at --teacher_reference_steps with --teacher_reference_scheduler)")
    p.add_argument("--teacher_reference_steps", type=int, default=50)
    p.add_argument("--teacher_reference_scheduler", default="ddim")
    p.add_argument("--out", default="fewstep-eval")
    p.add_argument("--device", default=None)
    a = p.parse_args(argv)
    from .diffusion.sampling import check_scheduler
    from .eval.metrics import EXTRACTORS
    from .eval.run import EvalRun, check_runs, evaluate, load_reference, plan_runs, sampling_hints

    for b in a.baselines:  # before any image is generated
        check_scheduler(b, "--baselines")
    check_scheduler(a.teacher_reference_scheduler, "--teacher_reference_scheduler")
    if a.teacher_reference_steps < 1:
        raise ConfigError("--teacher_reference_steps must be >= 1")
    if a.num_images < 1 or a.batch_size < 1:
        raise ConfigError("--num_images and --batch_size must be >= 1")
    if a.prompts and not Path(a.prompts).is_file():
        raise ConfigError(f"--prompts {a.prompts}: no such file (give a text file, one prompt per line)")

    models = []
    for m in a.model:
        label, eq, path = m.partition("=")
        models.append((label, path) if eq else (Path(m).name, m))
    runs = plan_runs(models, a.steps, a.teacher_steps, a.baselines, a.guidance_scale)
    ref = None
    if a.teacher_reference:
        paths = dict(models)
        if a.teacher_reference not in paths:
            raise ConfigError(f"--teacher_reference {a.teacher_reference}: not one of the --model labels "
                              f"({', '.join(paths)})")
        path = paths[a.teacher_reference]
        gs = a.guidance_scale if a.guidance_scale is not None else sampling_hints(path).get("guidance_scale", 1.0)
        ref = EvalRun(a.teacher_reference, path, a.teacher_reference_scheduler, a.teacher_reference_steps, gs)
    check_runs(runs + ([ref] if ref else []))  # every run, before any model loads
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
                   prompts, a.resolution, a.batch_size, a.device, clip=clip, teacher_reference=ref)
    from .eval.report import markdown_table

    print(markdown_table(res))
    print(f"report: {Path(a.out) / 'report.md'}")
    return 0


def cmd_export(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="fewstep export", description=(
        "Write a LoRA student (fewstep distill output with LoRA) as a full diffusers pipeline folder, "
        "the LoRA merged into the UNet; or write the student of a checkpoint (a sharded --fsdp one "
        "included) as the run would have exported it."))
    p.add_argument("--model", help="the LoRA output folder of fewstep distill")
    p.add_argument("--fuse", action="store_true", help="merge the LoRA into the UNet (required with --model)")
    p.add_argument("--from_checkpoint", metavar="CKPT",
                   help="a checkpoint folder (sharded under --fsdp, or not): write the student the run would "
                        "have exported from it, in one process on the CPU")
    p.add_argument("--output_dir", required=True)
    a = p.parse_args(argv)
    if a.from_checkpoint:
        if a.model or a.fuse:
            raise ConfigError("--from_checkpoint writes a checkpoint's student: drop --model / --fuse")
        from .training.offline import export_checkpoint

        out = export_checkpoint(Path(a.from_checkpoint), Path(a.output_dir))
        print(f"student of {a.from_checkpoint} written to {out}")
        return 0
    if not a.model:
        raise ConfigError("give --model LORA_FOLDER --fuse, or --from_checkpoint CKPT")
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
        "Distil the bundled MNIST teacher with LCD and compare the student at 1/2/4 steps with the teacher's "
        "training-free samplers at the same steps. Ctrl-C stops it (a checkpoint is saved); running it again "
        "continues."))
    p.add_argument("--output_dir", default="fewstep-demo")
    p.add_argument("--max_train_steps", type=int, default=None, help="default: the embedded 250")
    p.add_argument("--num_images", type=int, default=300, help="images per evaluated row")
    a = p.parse_args(argv)
    from .demo import print_summary, run_demo

    s = run_demo(a.output_dir, a.max_train_steps, a.num_images)
    if s["stopped"]:
        print(f"fewstep demo: stopped at step {s['step']}; run `fewstep demo"
              + (f" --output_dir {a.output_dir}" if a.output_dir != "fewstep-demo" else "")
              + "` again to continue from there", file=sys.stderr)
        return 130
    print_summary(s, a.num_images)
    return 0


def cmd_generate(argv: list[str]) -> int:
    from .generate import cmd_generate as run

    return run(argv)


def cmd_compare(argv: list[str]) -> int:
    from .compare import cmd_compare as run

    return run(argv)


COMMANDS = {"demo": cmd_demo, "generate": cmd_generate, "eval": cmd_eval, "distill": cmd_distill, "export": cmd_export,
            "train-teacher": cmd_train_teacher, "sample": cmd_sample, "cache": cmd_cache, "methods": cmd_methods,
            "presets": cmd_presets, "push": cmd_push, "compare": cmd_compare}


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
    from .logs import quiet_libraries
    from .training.checkpoint import CheckpointError

    quiet_libraries()
    try:
        return COMMANDS[cmd](rest)
    except ConfigError as e:
        print(f"fewstep {cmd}: error: {e}", file=sys.stderr)
        return 2
    except CheckpointError as e:
        print(f"fewstep {cmd}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside training (training saves and returns on its own)
        print(f"fewstep {cmd}: interrupted", file=sys.stderr)
        return 130
