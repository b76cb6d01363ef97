"""Typed run configuration: dataclasses, YAML files, command-line overrides, validation.

One flat namespace of keys, as users type them (the diffusers consistency-distillation flag names,
PaddleMIX and DMD2 names as aliases). The common keys live in :class:`TrainConfig`; each method adds
its own dataclass (``Method.Config``). A key no dataclass declares is rejected with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

DEFAULT_VALIDATION_PROMPTS = [
    "a handwritten digit zero",
    "a handwritten digit three",
    "a handwritten digit seven",
    "a photo of a cat",
]


class ConfigError(ValueError):
    """A bad key or value; the message names the fix."""


@dataclass
class TrainConfig:
    """Keys shared by every method. Help text is the comment after each field."""

    method: str = "lcm"  # distillation method: see `fewstep methods`
    output_dir: str = "fewstep-output"  # where checkpoints, logs, validation images and the student go
    seed: int = 0  # global seed; per-rank streams are derived from it
    dry_run: bool = False  # validate config, load model configs (not weights), open one sample, exit

    # teacher
    pretrained_teacher_model: str | None = None  # diffusers folder or hub id of the teacher
    teacher_revision: str | None = None  # hub revision of the teacher
    pretrained_vae_model_name_or_path: str | None = None  # another VAE (folder or hub id) to use
    cast_teacher_unet: bool = False  # hold the frozen teacher in the mixed-precision dtype

    # data
    train_data_dir: str | None = None  # image folder with .txt captions or metadata.jsonl/csv
    train_shards_path_or_url: str | None = None  # WebDataset shards: path, {a..b} braces, pipe:, URL
    dataset_name: str | None = None  # Hugging Face datasets name or local path
    file_list: str | None = None  # PaddleMIX file list: lines "list_file [weight]"
    data_resampling: bool = False  # shards / file lists: endless stream drawn with replacement, no epochs
    cache_dir: str | None = None  # train from `fewstep cache` output: no VAE encoder, no text encoder
    image_column: str = "image"  # image column of metadata / datasets
    caption_column: str = "text"  # caption column of metadata / datasets
    max_train_samples: int | None = None  # truncate the data set to this many samples
    resolution: int = 512  # square training resolution in pixels
    center_crop: bool = False  # center crop instead of random crop
    random_flip: bool = False  # random horizontal flip
    use_fix_crop_and_size: bool = False  # SDXL: time ids (res, res, 0, 0, res, res) instead of the real ones
    interpolation_type: str = "bilinear"  # resize filter: bilinear, bicubic, nearest, lanczos
    proportion_empty_prompts: float = 0.0  # fraction of captions replaced by the empty prompt
    dataloader_num_workers: int = 0  # data loading worker processes per rank
    max_bad_fraction: float = 0.5  # stop when more than this fraction of samples seen is unusable

    # optimisation
    train_batch_size: int = 16  # per device
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 1000  # optimizer steps
    learning_rate: float = 1e-6
    lr_scheduler: str = "constant"  # any diffusers scheduler name: constant, cosine, linear, ...
    lr_warmup_steps: int = 500
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0  # gradient clipping; <= 0 disables
    mixed_precision: str = "no"  # no, fp16, bf16 (trainable weights stay fp32)
    allow_tf32: bool = False
    gradient_checkpointing: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    vae_encode_batch_size: int = 32  # images per VAE encode call

    # speed (docs/PERFORMANCE.md): none of these changes what a step computes
    cudnn_benchmark: bool = True  # CUDA: time cuDNN's convolution algorithms once per shape, keep the fastest
    channels_last: bool = False  # UNets and latents in channels-last memory layout (faster convs on GPUs)
    torch_compile: bool = False  # torch.compile every UNet the step runs (first steps compile, slower)
    torch_compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, ...
    torch_compile_backend: str = "inductor"  # inductor (fast kernels, CUDA only here) or aot_eager (traces, no codegen: checks)
    adam_impl: str = "auto"  # AdamW kernels: fused, foreach, or auto (fused on CUDA, else foreach)

    # logging, validation, checkpoints
    report_to: str = "tensorboard"  # tensorboard, wandb, all or none
    logging_dir: str = "logs"  # relative to output_dir
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: int = 200  # 0 disables validation grids
    validation_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_VALIDATION_PROMPTS))
    validation_inference_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    validation_guidance_scale: float | None = None  # guidance of validation samples (default: the method's)
    max_nan_steps: int = 20  # consecutive non-finite losses tolerated before stopping


# PaddleMIX / HF-Trainer names users already type -> our key.
ALIASES = {
    "pretrained_model_name_or_path": "pretrained_teacher_model",
    "per_device_train_batch_size": "train_batch_size",
    "max_steps": "max_train_steps",
    "recompute": "gradient_checkpointing",
    "image_logging_steps": "validation_steps",
    "save_steps": "checkpointing_steps",
    "save_total_limit": "checkpoints_total_limit",
    "weight_decay": "adam_weight_decay",
    "lr_scheduler_type": "lr_scheduler",
    "warmup_steps": "lr_warmup_steps",
    # DMD2's scripts
    "model_id": "pretrained_teacher_model",
    "output_path": "output_dir",
}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _convert(key: str, value: Any, tp) -> Any:
    """Coerce a YAML/CLI value to the annotated type ``tp``, with a message naming the key."""
    if isinstance(tp, str):
        tp = eval(tp, {**vars(typing), "list": list}, {})  # annotations are strings (__future__)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(key, value, args[0])
    if value is None:
        raise ConfigError(f"--{key} needs a value")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, bool) or not isinstance(value, (str, list, tuple, int, float)):
            raise ConfigError(f"--{key} expects a list, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, str):
            # Prompts may contain commas, so they are separated by "|"; other lists by commas or spaces
            # (diffusers' scripts take --lora_target_modules "to_q,to_k,to_v").
            sep = "|" if key == "validation_prompts" else ","
            value = [v.strip() for v in (value.split(sep) if inner is str else value.replace(",", " ").split())
                     if v.strip()]
        return [_convert(key, v, inner) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true or false, got {value!r}")
    # A YAML list, mapping or boolean where a scalar belongs would otherwise be turned silently into
    # its string or 0/1 (str([1, 2]), int(True)).
    if isinstance(value, (list, tuple, dict, set)) or (isinstance(value, bool) and tp is not str):
        raise ConfigError(f"--{key} expects {tp.__name__}, got {value!r}")
    if isinstance(value, bool):  # YAML reads no/yes/off/on as booleans
        raise ConfigError(f"--{key}: YAML read {value!r} as a boolean; quote the value (e.g. {key}: \"no\")")
    try:
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        out = tp(value)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(f"--{key} expects {tp.__name__}, got {value!r}") from None
    if tp is float and not math.isfinite(out):
        raise ConfigError(f"--{key} expects a finite number, got {value!r}")
    return out


def parse_cli_pairs(argv: list[str], bool_keys: set[str]) -> dict[str, Any]:
    """`--key value`, `--key=value`, and bare `--flag` for booleans; values stay strings."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument {tok!r}: options look like --key value")
        key, eq, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if eq:
            out[key] = val
            i += 1
            continue
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        canonical = ALIASES.get(key, key)
        if canonical in bool_keys and (nxt is None or nxt.startswith("--") or nxt.lower() not in (
            "true", "false", "1", "0", "yes", "no", "on", "off")):
            out[key] = True
            i += 1
        elif nxt is None or (nxt.startswith("--") and canonical not in bool_keys):
            raise ConfigError(f"--{key} needs a value")
        else:
            # a list key may take several space-separated values (`--validation_inference_steps 1 2 4`)
            vals = [nxt]
            j = i + 2
            while j < len(argv) and not argv[j].startswith("--"):
                vals.append(argv[j])
                j += 1
            out[key] = vals[0] if len(vals) == 1 else vals
            i = j
    return out


@dataclass
class FamilyDefault:
    """A recipe value that depends on the teacher's model family (a method's reference trains SDXL with
    other values than SD, e.g.): set ``key`` to ``value`` unless the user gave ``key``; ``when``: other
    keys and the values they must have for the rule to apply (e.g. a switch that must be on);
    ``source``: where the value comes from, printed by --dry_run."""

    key: str
    value: Any
    source: str
    when: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunSpec:
    """A resolved run: the common config, the chosen method's config and the method itself (the class
    the trainer builds; config code never imports methods, the caller passes them in).

    ``teacher_family``: the family label whose recipe defaults were resolved (None: not resolved yet);
    ``applied`` / ``overridden``: those defaults that were set, and those the user's own values beat;
    ``raw``: the keys as given, to resolve again for another family (:meth:`with_family`)."""

    train: TrainConfig
    method: Any
    method_cls: Any = None
    teacher_family: str | None = None
    applied: list[FamilyDefault] = field(default_factory=list)
    overridden: list[tuple[FamilyDefault, Any]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self.train), **dataclasses.asdict(self.method)}

    def with_family(self, family: str) -> RunSpec:
        """The same keys resolved with the recipe defaults of teacher family ``family``."""
        return resolve(self.raw, {self.train.method: self.method_cls}, type(self.train), family=family)

    def family_report(self) -> list[str]:
        """Lines for --dry_run: each family default in force, and each one the user's value replaced."""
        if self.teacher_family is None:
            return []
        lines = [f"family defaults for teacher family {self.teacher_family!r} (values you give always win):"]
        lines += [f"  --{d.key} {d.value!r}  [{d.source}]" for d in self.applied]
        lines += [f"  --{d.key} {mine!r}: yours, instead of the family's {d.value!r}  [{d.source}]"
                  for d, mine in self.overridden]
        if len(lines) == 1:
            lines.append("  none: every setting is the method's own default or yours")
        return lines

    def dump(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def resolve(raw: dict[str, Any], methods: dict[str, type], base: type = TrainConfig,
            family: str | typing.Callable[[RunSpec], str | None] | None = None) -> RunSpec:
    """Bind raw keys (from YAML and CLI, already merged) to ``base`` + the method's dataclass.
    ``methods``: name → method class (anything with a ``Config`` dataclass), e.g. the methods registry.

    ``family``: the teacher's family label, or a function of the bound (not yet validated) spec that
    returns it (None where there is no teacher). The method class's ``family_defaults(label)`` rules
    then set the keys the user did not give, before validation, so that checks see the values the run
    will use."""
    method_configs = {name: m.Config for name, m in methods.items()}
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"option names must be strings, got {bad_keys[0]!r}")
    raw = {ALIASES.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in raw.items()}
    method = raw.get("method", base.method if hasattr(base, "method") else None)
    if not isinstance(method, str) or method not in method_configs:
        hint = difflib.get_close_matches(str(method), list(method_configs), n=1)
        raise ConfigError(
            f"unknown --method {method!r}; available: {', '.join(sorted(method_configs))}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    mcls = method_configs[method]
    common, own = _fields(base), _fields(mcls)
    unknown = [k for k in raw if k not in common and k not in own]
    if unknown:
        k = unknown[0]
        others = [m for m, c in method_configs.items() if k in _fields(c)]
        if others:
            raise ConfigError(f"--{k} is a setting of --method {others[0]}, not of --method {method}")
        known = list(common) + list(own) + list(ALIASES)
        hint = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
        raise ConfigError(f"unknown option --{k}" + (f"; did you mean --{hint[0]}?" if hint else ""))
    tvals = {k: _convert(k, v, common[k].type) for k, v in raw.items() if k in common}
    mvals = {k: _convert(k, v, own[k].type) for k, v in raw.items() if k in own}
    spec = RunSpec(base(**tvals), mcls(**mvals), methods[method], raw=dict(raw))
    if callable(family):
        family = family(spec)
    if family is not None:
        _apply_family_defaults(spec, family, common, own)
    for obj in (spec.train, spec.method):
        check = getattr(obj, "validate", None)
        if check:
            try:
                check()
            except ConfigError as e:
                if not spec.applied:
                    raise
                used = ", ".join(f"--{d.key} {d.value!r}" for d in spec.applied)
                raise ConfigError(f"{e} (family defaults for {family!r} in force: {used}; give a key to "
                                  "override its default)") from None
    return spec


def _apply_family_defaults(spec: RunSpec, family: str, common: dict, own: dict) -> None:
    """Set each recipe default of ``family`` whose conditions hold on a key the user did not give."""
    spec.teacher_family = family
    rules = getattr(spec.method_cls, "family_defaults", None)
    for d in (rules(family) if rules else []):
        target, fields = (spec.train, common) if d.key in common else (spec.method, own)
        if d.key not in fields:
            raise ConfigError(f"family default {d.key!r} ({d.source}) is not a setting of --method "
                              f"{spec.train.method}")  # a broken recipe table, caught by the tests
        if any(_current(spec, k) != v for k, v in d.when.items()):
            continue
        if d.key in spec.raw:
            spec.overridden.append((d, getattr(target, d.key)))
            continue
        setattr(target, d.key, _convert(d.key, d.value, fields[d.key].type))
        spec.applied.append(d)


def _current(spec: RunSpec, key: str) -> Any:
    return getattr(spec.train, key) if hasattr(spec.train, key) else getattr(spec.method, key)


def load_yaml(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"--config {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"--config {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must be a mapping of key: value")
    return data


def validate_train(c: TrainConfig) -> None:
    """Checks that need no model or file: every bad value is reported before anything loads."""

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(c.mixed_precision in ("no", "fp16", "bf16"), "--mixed_precision must be no, fp16 or bf16")
    need(c.train_batch_size >= 1, "--train_batch_size must be >= 1")
    need(c.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be >= 1")
    need(c.max_train_steps >= 1, "--max_train_steps must be >= 1")
    need(c.learning_rate > 0, "--learning_rate must be > 0")
    need(c.resolution >= 8 and c.resolution % 8 == 0, "--resolution must be a positive multiple of 8")
    need(0.0 <= c.proportion_empty_prompts <= 1.0, "--proportion_empty_prompts must be in [0, 1]")
    need(c.checkpointing_steps >= 1, "--checkpointing_steps must be >= 1")
    need(c.checkpoints_total_limit is None or c.checkpoints_total_limit >= 1,
         "--checkpoints_total_limit must be >= 1 (or unset to keep all)")
    need(c.validation_steps >= 0, "--validation_steps must be >= 0 (0 disables validation)")
    need(c.vae_encode_batch_size >= 1, "--vae_encode_batch_size must be >= 1")
    need(c.dataloader_num_workers >= 0, "--dataloader_num_workers must be >= 0")
    need(c.report_to in ("tensorboard", "wandb", "all", "none"), "--report_to must be tensorboard, wandb, all or none")
    need(c.interpolation_type in ("bilinear", "bicubic", "nearest", "lanczos"),
         "--interpolation_type must be bilinear, bicubic, nearest or lanczos")
    need(all(s >= 1 for s in c.validation_inference_steps), "--validation_inference_steps must be >= 1")
    need(c.adam_impl in ("auto", "fused", "foreach"), "--adam_impl must be auto, fused or foreach")
    need(c.torch_compile_mode in ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
         "--torch_compile_mode must be default, reduce-overhead, max-autotune or max-autotune-no-cudagraphs")
    need(c.torch_compile_backend in ("inductor", "aot_eager"), "--torch_compile_backend must be inductor or aot_eager")
    need(c.torch_compile_backend == "inductor" or c.torch_compile_mode == "default",
         "--torch_compile_mode applies to the inductor backend only: drop it, or use --torch_compile_backend inductor")
    need(not (c.use_8bit_adam and c.adam_impl == "fused"),
         "--adam_impl fused and --use_8bit_adam exclude each other: bitsandbytes has its own kernels")
    need(c.max_nan_steps >= 1, "--max_nan_steps must be >= 1")
    need(0 < c.max_bad_fraction <= 1, "--max_bad_fraction must be in (0, 1]")
    sources = [s for s in (c.train_data_dir, c.train_shards_path_or_url, c.dataset_name, c.file_list, c.cache_dir) if s]
    need(len(sources) <= 1, "give one data source: --train_data_dir, --train_shards_path_or_url, --dataset_name, "
         "--file_list or --cache_dir")
    need(not c.data_resampling or bool(c.train_shards_path_or_url or c.file_list),
         "--data_resampling applies to streamed data: --train_shards_path_or_url or --file_list")
    from diffusers.optimization import SchedulerType

    names = [s.value for s in SchedulerType]
    need(c.lr_scheduler in names, f"--lr_scheduler {c.lr_scheduler!r} is not one of {', '.join(names)}")


TrainConfig.validate = validate_train  # type: ignore[attr-defined]


def describe(cls) -> str:
    """One line per key with its default, for `fewstep distill --help`."""
    import inspect

    src = inspect.getsource(cls)
    helps = {}
    for line in src.splitlines():
        line = line.strip()
        if ":" in line and "#" in line and not line.startswith("#"):
            helps[line.split(":")[0].strip()] = line.split("#", 1)[1].strip()
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append(f"  --{f.name:<44} {json.dumps(default)!s:<14} {helps.get(f.name, '')}")
    return "\n".join(rows)
