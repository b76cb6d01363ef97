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
import os
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
    preset: str | None = None  # a preset (`fewstep presets`) whose keys sit under --config and the flags
    overwrite_output_dir: bool = False  # start afresh in an --output_dir holding another run (its checkpoints and export are deleted)
    do_train: bool = True  # HF Trainer / PaddleMIX: distill always trains (--do_train false is refused; see --dry_run)

    # teacher
    pretrained_teacher_model: str | None = None  # diffusers folder or hub id of the teacher
    teacher_revision: str | None = None  # hub revision of the teacher
    pretrained_vae_model_name_or_path: str | None = None  # another VAE (folder or hub id) to use
    cast_teacher_unet: bool = False  # hold the frozen teacher in the mixed-precision dtype
    model_max_length: int | None = None  # tokenizer length prompts are padded / truncated to (default: the teacher's)
    is_sdxl: bool | None = field(default=None, metadata={"family_flag": True})  # PaddleMIX: assert the teacher is (not) SDXL

    # data
    train_data_dir: str | None = None  # image folder with .txt captions or metadata.jsonl/csv
    train_shards_path_or_url: str | None = None  # WebDataset shards: path, {a..b} braces, pipe:, URL
    dataset_name: str | None = None  # Hugging Face datasets name or local path
    file_list: str | None = None  # PaddleMIX file list: lines "list_file [weight]"
    data_resampling: bool = False  # shards / file lists: endless stream drawn with replacement, no epochs
    cache_dir: str | None = None  # train from `fewstep cache` output: no VAE encoder, no text encoder
    dataset_base_path: str | None = None  # folder the metadata file's image paths are relative to (default: its own)
    image_column: str = "image"  # image column of metadata / datasets
    caption_column: str = "text"  # caption column of metadata / datasets
    caption_extension: str | None = None  # image-folder caption sidecars (kohya): default .txt, else .caption
    extra_inputs: list[str] = field(default_factory=list)  # DiffSynth: metadata columns the method reads (checked)
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
    num_train_epochs: int | None = None  # passes over the data; sets --max_train_steps when that is not given
    dataset_repeat: int = 1  # DiffSynth: each epoch passes over the data this many times
    learning_rate: float = 1e-6
    lr_scheduler: str = "constant"  # diffusers schedule: constant, constant_with_warmup, cosine, linear, ...
    lr_warmup_steps: int | None = None  # linear warmup in iterations (default: 500, or 0 with constant)
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

    # sharding (docs/SHARDING.md): networks too large for one device
    fsdp: bool = False  # shard networks, gradients and optimizer state across processes (FSDP2)
    fsdp_frozen: str = "auto"  # --fsdp, frozen teacher / real score: shard, replicate, auto (shard from 1 GiB)
    fsdp_offload: bool = False  # --fsdp: parameters, gradients and optimizer state in CPU memory
    fsdp_reshard_after_forward: bool = True  # --fsdp: free gathered weights after each forward
    fsdp_wrap: list[str] | None = None  # --fsdp: class names of the units (default: blocks >= 1 % of a network)
    rng_streams: str = "auto"  # rank, batch (per micro-batch: any process count), auto (batch under --fsdp)

    # speed (docs/PERFORMANCE.md): none of these changes what a step computes
    cudnn_benchmark: bool = True  # CUDA: time cuDNN's convolution algorithms once per shape, keep the fastest
    channels_last: bool = False  # UNets and latents in channels-last memory layout (faster convs on GPUs)
    torch_compile: bool = False  # torch.compile every UNet the step runs (first steps compile, slower)
    torch_compile_mode: str = "default"  # torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune, ...
    torch_compile_backend: str = "inductor"  # inductor (fast kernels, CUDA only here) or aot_eager (traces, no codegen: checks)
    adam_impl: str = "auto"  # AdamW kernels: fused, foreach, or auto (fused on CUDA, else foreach)

    # logging, validation, checkpoints
    report_to: str = "tensorboard"  # tensorboard, wandb, all or none
    tracker_project_name: str = "fewstep"  # project name of the TensorBoard / wandb run
    logging_dir: str = "logs"  # relative to output_dir
    logging_steps: int = 1  # tracker logs every N steps (means over them); one log line per N steps under --disable_tqdm
    disable_tqdm: bool = False  # no progress bar (log lines instead)
    find_unused_parameters: bool = False  # DDP: tolerate parameters that get no gradient in a step
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    validation_steps: int = 200  # 0 disables validation grids
    validation_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_VALIDATION_PROMPTS))
    validation_inference_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    validation_guidance_scale: float | None = None  # guidance of validation samples (default: the method's)
    max_nan_steps: int = 20  # consecutive non-finite losses tolerated before stopping

    # Hugging Face Hub (after the run; `fewstep push` does the same later)
    push_to_hub: bool = False  # create the repo and upload the exported student and its card
    hub_model_id: str | None = None  # repo id (default: the name of --output_dir)
    hub_token: str | None = field(default=None, metadata={"secret": True})  # default: the saved login / HF_TOKEN


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
    "output_path": "output_dir",  # (DiffSynth-Studio's too)
    # diffusers' other training scripts
    "validation_prompt": "validation_prompts",
    # DiffSynth-Studio's train.py
    "num_epochs": "num_train_epochs",
    "dataset_metadata_path": "train_data_dir",
    "use_gradient_checkpointing": "gradient_checkpointing",
    "dataset_num_workers": "dataloader_num_workers",
}

# DiffSynth-Studio names the trained model part; fewstep trains the teacher's denoiser, whatever the family
# calls it. These are the names that mean it.
DENOISER_NAMES = ("dit", "unet", "transformer", "denoiser")

# Options of the reference tools with no fewstep equivalent: refused by name, with what to do instead.
REFUSED = {
    "max_pixels": "DiffSynth-Studio's --max_pixels keeps each image's aspect ratio under a pixel budget; fewstep "
                  "trains at one square size: use --resolution N (e.g. N = 1024 for --max_pixels 1048576)",
    "model_paths": "DiffSynth-Studio's --model_paths lists weight files; fewstep loads a diffusers pipeline folder "
                   "or hub id: use --pretrained_teacher_model",
    "use_gradient_checkpointing_offload": "offloading checkpointed activations to the CPU is not implemented; use "
                                          "--gradient_checkpointing",
}

# Translations of the reference tools' options whose value decides which fewstep keys they set. Each takes the
# value and the raw keys so far and returns the keys to set; a ConfigError refuses the option by name.


def _split_list(value) -> list[str]:
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    return [str(v).strip() for v in items if str(v).strip()]


def _from_data_file_keys(value, raw):
    keys = _split_list(value)
    if len(keys) != 1:
        raise ConfigError(f"--data_file_keys {value}: fewstep reads one image per sample (--image_column); "
                          "edit / control images are not inputs of any fewstep method")
    return {"image_column": keys[0]}


def _from_model_id_with_origin_paths(value, raw):
    ids = sorted({part.split(":", 1)[0].strip() for part in _split_list(value)})
    if len(ids) != 1:
        raise ConfigError(f"--model_id_with_origin_paths names {len(ids)} models ({', '.join(ids)}); fewstep "
                          "loads one diffusers pipeline: use --pretrained_teacher_model")
    if raw.get("pretrained_teacher_model") not in (None, ids[0]):
        raise ConfigError(f"--model_id_with_origin_paths ({ids[0]}) and --pretrained_teacher_model "
                          f"({raw['pretrained_teacher_model']}) disagree: give one")
    return {"pretrained_teacher_model": ids[0]}


def _denoiser_name(flag: str, value) -> str:
    name = str(value).strip()
    if name not in DENOISER_NAMES:
        raise ConfigError(f"--{flag} {value}: fewstep trains the teacher's denoiser only ({', '.join(DENOISER_NAMES)})")
    return name


def _from_lora_base_model(value, raw):
    _denoiser_name("lora_base_model", value)
    # DiffSynth-Studio trains a LoRA on the named part as soon as it is given, at its default rank 32.
    return {} if raw.get("lora_rank") is not None else {"lora_rank": 32}


def _from_trainable_models(value, raw):
    _denoiser_name("trainable_models", value)
    if raw.get("lora_rank") is not None or "lora_base_model" in raw:
        raise ConfigError("--trainable_models trains the full denoiser, --lora_rank / --lora_base_model trains "
                          "adapters: give one")
    return {}


def _from_remove_prefix_in_ckpt(value, raw):
    # DiffSynth-Studio saves the trained part's keys without "pipe.<part>."; fewstep's files are already keyed
    # relative to the denoiser (diffusers / PEFT names), which is what the option asks for.
    prefix = str(value).strip()
    if not (prefix.startswith("pipe.") and prefix.endswith(".") and prefix[5:-1] in DENOISER_NAMES):
        raise ConfigError(f"--remove_prefix_in_ckpt {value}: fewstep's weight files carry diffusers / PEFT key names "
                          "relative to the denoiser; only 'pipe.<denoiser>.' (e.g. 'pipe.dit.') matches that")
    return {}


TRANSLATED = {
    "data_file_keys": _from_data_file_keys,
    "model_id_with_origin_paths": _from_model_id_with_origin_paths,
    "lora_base_model": _from_lora_base_model,
    "trainable_models": _from_trainable_models,
    "remove_prefix_in_ckpt": _from_remove_prefix_in_ckpt,
}
# Options only DiffSynth-Studio's train.py has: a command with one of them is one of its commands.
DIFFSYNTH_ONLY = {"dataset_base_path", "task", "lora_base_model", "trainable_models", "model_id_with_origin_paths",
                  "remove_prefix_in_ckpt", "data_file_keys", "extra_inputs", "dataset_repeat", "max_pixels",
                  "model_paths"}
# Options that take a value (so a bare one is "needs a value", not an unknown option).
FOREIGN_KEYS = set(REFUSED) | set(TRANSLATED) | {"height", "width", "task"}


def translate_foreign(raw: dict[str, Any], method_tasks: dict[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Options of the reference tools (DiffSynth-Studio's ``train.py``) as fewstep keys, and the messages of
    those refused. ``raw`` has canonical key names (aliases applied); ``method_tasks`` maps DiffSynth
    ``--task`` names to fewstep methods (each method declares its own)."""
    out = {k: v for k, v in raw.items() if k not in FOREIGN_KEYS}
    errors = [f"--{k}: {REFUSED[k]}" for k in raw if k in REFUSED]
    if "height" in raw or "width" in raw:
        h, w = raw.get("height"), raw.get("width")
        if h is not None and w is not None and str(h).strip() != str(w).strip():
            errors.append(f"--height {h} --width {w}: fewstep trains square images; use --resolution N")
        elif "resolution" in raw:
            errors.append("--height / --width and --resolution set the same thing: give one")
        else:
            out["resolution"] = h if h is not None else w
    if any(k in raw for k in DIFFSYNTH_ONLY) and "train_batch_size" not in raw:
        out["train_batch_size"] = 1  # DiffSynth-Studio's train.py takes one sample per step
    if raw.get("dataset_base_path") is not None and "train_data_dir" not in raw:
        out["train_data_dir"] = raw["dataset_base_path"]  # DiffSynth-Studio: the folder alone, images listed there
    if "task" in raw:
        task = str(raw["task"])
        if task not in method_tasks:
            errors.append(f"--task {task}: not a fewstep method; DiffSynth-Studio tasks fewstep runs: "
                          + ", ".join(f"{t} (--method {m})" for t, m in method_tasks.items()))
        elif raw.get("method", method_tasks[task]) != method_tasks[task]:
            errors.append(f"--task {task} means --method {method_tasks[task]}, but --method {raw['method']} was given")
        else:
            out["method"] = method_tasks[task]
    for k in raw:
        if k in TRANSLATED:
            try:
                out.update(TRANSLATED[k](raw[k], {**raw, **out}))
            except ConfigError as e:
                errors.append(str(e))
    return out, errors


def _is_hub_key(key: str) -> bool:
    return key.startswith(("hub_", "push_"))


def suggest(key: str, known: list[str]) -> str | None:
    """The closest known option, never across the hub / model boundary (``--hub_model_id`` is not the
    teacher's ``--model_id``)."""
    pool = [k for k in known if _is_hub_key(k) == _is_hub_key(key)]
    hint = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
    return hint[0] if hint else None


def check_cache_dir_is_fewsteps(value: Any) -> None:
    """diffusers' ``--cache_dir`` is the Hugging Face download cache; fewstep's is a ``fewstep cache`` folder.
    A folder laid out as the former gets a message saying so, before the cache check reads it."""
    p = Path(str(value)).expanduser()
    hf_layout = p.is_dir() and (any(p.glob("models--*")) or any(p.glob("datasets--*")) or (p / "hub").is_dir()
                                or (p / ".locks").is_dir())
    if hf_layout or not p.exists():
        what = "looks like a Hugging Face download cache" if hf_layout else "does not exist"
        raise ConfigError(
            f"--cache_dir {value} {what}. fewstep's --cache_dir is a folder of precomputed latents and text "
            "embeddings written by `fewstep cache` (not the download cache of diffusers' scripts): drop it, or "
            "make one with `fewstep cache ... --output_dir DIR`. To move the Hugging Face download cache, set "
            "HF_HOME or HF_HUB_CACHE")


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


def parse_cli_pairs(argv: list[str], bool_keys: set[str], known: set[str] | None = None) -> dict[str, Any]:
    """`--key value`, `--key=value`, and bare `--flag` for booleans; values stay strings. With ``known``
    (every key and alias), a bare option that is not one is kept (as True) for :func:`resolve` to report
    among the unknown options, instead of failing alone as "needs a value"."""
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
            if known is not None and (canonical not in known or canonical in REFUSED):
                out[key] = True  # unknown or refused (whatever its value): reported with the others by resolve()
                i += 1
                continue
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
        """Every key and value, secrets (``--hub_token``) masked: this is what configs, logs, trackers and
        the uploaded folder see."""
        d = {**dataclasses.asdict(self.train), **dataclasses.asdict(self.method)}
        for f in dataclasses.fields(self.train):
            if f.metadata.get("secret") and d.get(f.name) is not None:
                d[f.name] = "<hidden>"
        return d

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


def known_keys(methods: dict[str, type], base: type = TrainConfig) -> set[str]:
    """Every option name :func:`resolve` accepts (keys of every method, aliases, translated options).
    ``methods``: name → method class (or its ``Config`` dataclass)."""
    configs = [getattr(m, "Config", m) for m in methods.values()]
    return ({f.name for c in [base, *configs] for f in dataclasses.fields(c)}
            | set(ALIASES) | FOREIGN_KEYS)


def resolve(raw: dict[str, Any], methods: dict[str, type], base: type = TrainConfig,
            method_tasks: dict[str, str] | None = None,
            family: str | typing.Callable[[RunSpec], str | None] | None = None) -> RunSpec:
    """Bind raw keys (from YAML and CLI, already merged) to ``base`` + the method's dataclass.
    ``methods``: name → method class (anything with a ``Config`` dataclass), e.g. the methods registry;
    ``method_tasks``: DiffSynth-Studio ``--task`` names → method.

    ``family``: the teacher's family label, or a function of the bound (not yet validated) spec that
    returns it (None where there is no teacher). The method class's ``family_defaults(label)`` rules
    then set the keys the user did not give, before validation, so that checks see the values the run
    will use.

    Every option that cannot be used (unknown, of another method, refused) is reported in one message."""
    method_configs = {name: getattr(m, "Config", m) for name, m in methods.items()}
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise ConfigError(f"option names must be strings, got {bad_keys[0]!r}")
    raw = {ALIASES.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in raw.items()}
    raw, problems = translate_foreign(raw, method_tasks or {})
    method = raw.get("method", base.method if hasattr(base, "method") else None)
    if not isinstance(method, str) or method not in method_configs:
        hint = difflib.get_close_matches(str(method), list(method_configs), n=1)
        raise ConfigError(
            f"unknown --method {method!r}; available: {', '.join(sorted(method_configs))}"
            + (f" (did you mean {hint[0]!r}?)" if hint else "")
        )
    mcls = method_configs[method]
    common, own = _fields(base), _fields(mcls)
    known = list(common) + list(own) + list(ALIASES)
    for k in [k for k in raw if k not in common and k not in own]:
        others = [m for m, c in method_configs.items() if k in _fields(c)]
        if others:
            problems.append(f"--{k} is a setting of --method {others[0]}, not of --method {method}")
        else:
            hint = suggest(k, known)
            problems.append(f"unknown option --{k}" + (f"; did you mean --{hint}?" if hint else ""))
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} options cannot be used:\n  " + "\n  ".join(problems))
    if raw.get("cache_dir") not in (None, "") and "cache_dir" in common:
        check_cache_dir_is_fewsteps(raw["cache_dir"])
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
                _with_family_note(e, spec, family)
    cross = getattr(spec.method, "validate_run", None)  # the method's checks that read common keys too
    if cross:
        try:
            cross(spec.train)
        except ConfigError as e:
            _with_family_note(e, spec, family)
    if isinstance(spec.train, TrainConfig):
        validate_habits(spec.train)
    return spec


def _with_family_note(e: ConfigError, spec: RunSpec, family) -> None:
    """Re-raise ``e``, naming the family defaults in force (a refusal may come from one of them)."""
    if not spec.applied:
        raise e
    used = ", ".join(f"--{d.key} {d.value!r}" for d in spec.applied)
    raise ConfigError(f"{e} (family defaults for {family!r} in force: {used}; give a key to "
                      "override its default)") from None


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
        # (a family default is not the user's choice: "has no effect" refusals look past it)
        target.__dict__.setdefault("_family_keys", set()).add(d.key)
        spec.applied.append(d)


def _current(spec: RunSpec, key: str) -> Any:
    return getattr(spec.train, key) if hasattr(spec.train, key) else getattr(spec.method, key)


# ---- every option does something ---------------------------------------------------------------
# A key that changes nothing in a run is refused (with what would make it apply), never silently
# ignored. The checks are written out where each key is validated; ``used_settings`` lists what a run
# uses, and tests/test_every_flag.py holds every key × method to "changes the used settings or is
# refused".


def changed(obj, *keys: str) -> list[str]:
    """The given keys of a config dataclass whose value differs from its default (as a default instance
    resolves it: ``__post_init__`` may fill in defaults that depend on other keys)."""
    default = type(obj)()
    family = getattr(obj, "_family_keys", set())  # set by the teacher family's recipe defaults, not by the user
    return [k for k in keys if k not in family and getattr(obj, k) != getattr(default, k)]


def refuse_changed(obj, keys, why: str) -> None:
    """ConfigError naming every key of ``keys`` that was set although, as ``why`` says, it has no effect."""
    bad = changed(obj, *keys)
    if bad:
        raise ConfigError(f"--{', --'.join(bad)} {'has' if len(bad) == 1 else 'have'} no effect {why}")


def micro_conditioning(bundle) -> bool | None:
    """Whether the teacher's family takes image size and crop conditioning (SDXL's time ids): a
    capability of the model bundle; None while the teacher is not known."""
    if bundle is None:
        return None
    return bool(bundle.micro_conditioning)


def check_teacher_settings(spec: RunSpec, bundle) -> None:
    """The refusals that need the teacher's family (run by --dry_run and the trainer once it is known)."""
    if spec.train.use_fix_crop_and_size and micro_conditioning(bundle) is False:
        raise ConfigError("--use_fix_crop_and_size sets SDXL's size and crop time ids, and this teacher's denoiser "
                          "takes none (no micro-conditioning): drop it")


def train_uses(c: TrainConfig) -> dict[str, Any]:
    """The common keys the trainer, the data pipeline and the optimizer use for these settings (keys
    whose use depends on the method are added by the method config's ``uses``)."""
    keys = ["method", "output_dir", "seed", "dry_run", "resolution", "center_crop", "random_flip",
            "interpolation_type", "max_train_samples", "dataloader_num_workers", "max_bad_fraction",
            "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "lr_scheduler", "use_8bit_adam",
            "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "max_grad_norm", "mixed_precision",
            "gradient_checkpointing", "enable_xformers_memory_efficient_attention", "torch_compile", "report_to",
            "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint", "validation_steps",
            "max_nan_steps", "fsdp", "rng_streams", "overwrite_output_dir", "disable_tqdm", "push_to_hub", "preset",
            "model_max_length", "is_sdxl",  # (these two: checked against the teacher's configs)
            "extra_inputs",  # checked against the first sample's columns (training/preflight.py)
            # the run's length when --max_train_steps is not given (runspec.apply_epochs)
            "num_train_epochs", "dataset_repeat",
            # the machine decides what these do (CUDA only), not other options
            "allow_tf32", "cudnn_benchmark", "channels_last", "find_unused_parameters"]
    keys += [k for k in ("train_data_dir", "train_shards_path_or_url", "dataset_name", "file_list", "cache_dir")
             if getattr(c, k)]
    keys += ["data_resampling"] if (c.train_shards_path_or_url or c.file_list) else []
    keys += ["image_column", "caption_column"] if (c.train_data_dir or c.dataset_name) else []
    keys += ["lr_warmup_steps"] if c.lr_scheduler != "constant" else []
    keys += ["torch_compile_mode", "torch_compile_backend"] if c.torch_compile else []
    keys += ["adam_impl"] if not c.use_8bit_adam else []
    keys += ["logging_dir", "tracker_project_name"] if c.report_to != "none" else []
    keys += ["logging_steps"] if c.report_to != "none" or c.disable_tqdm else []
    keys += ["hub_model_id", "hub_token"] if c.push_to_hub else []
    keys += ["caption_extension", "dataset_base_path"] if c.train_data_dir else []  # how a folder / metadata is read
    keys += ["fsdp_frozen", "fsdp_offload", "fsdp_reshard_after_forward", "fsdp_wrap"] if c.fsdp else []
    keys += ["validation_prompts", "validation_inference_steps"] if c.validation_steps else []
    return {k: getattr(c, k) for k in keys}


def teacher_uses(c: TrainConfig) -> dict[str, Any]:
    """The keys of a method that loads a teacher folder."""
    keys = ["pretrained_teacher_model", "pretrained_vae_model_name_or_path"]
    keys += ["teacher_revision"] if not _is_local(c.pretrained_teacher_model) else []
    return {k: getattr(c, k) for k in keys}


def used_settings(spec: RunSpec, bundle=None) -> dict[str, Any]:
    """Every key this run uses, with its value: the trainer's (:func:`train_uses`) and the method's
    (``Config.uses(train, bundle)``, which adds keys only some methods, settings or teacher families use)."""
    return {**train_uses(spec.train), **spec.method.uses(spec.train, bundle)}


def _is_local(path: str | None) -> bool:
    return bool(path) and Path(path).expanduser().exists()


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


def installed(module: str) -> bool:
    """Whether an optional package can be imported (checked before any model loads)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def has_gpu() -> bool:
    """Whether this machine has a CUDA device (settings that only act on one are refused without it)."""
    import torch

    return torch.cuda.is_available()


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
    validate_sharding(c)
    # options that would change nothing with these settings (see "every option does something")
    if not c.torch_compile:
        refuse_changed(c, ("torch_compile_mode", "torch_compile_backend"), "without --torch_compile: add it, or drop them")
    if c.use_8bit_adam:
        refuse_changed(c, ("adam_impl",), "with --use_8bit_adam, which has its own kernels: drop it")
    if c.report_to == "none":
        refuse_changed(c, ("logging_dir", "tracker_project_name"), "with --report_to none (no tracker writes logs): "
                       "drop it")
        if not c.disable_tqdm:
            refuse_changed(c, ("logging_steps",), "with --report_to none and the progress bar on (it spaces tracker "
                           "logs and --disable_tqdm's log lines): drop it, or add --disable_tqdm")
    if not c.validation_steps:
        refuse_changed(c, ("validation_prompts", "validation_inference_steps"),
                       "with --validation_steps 0 (no validation): set --validation_steps N, or drop them")
    if not c.train_data_dir:
        refuse_changed(c, ("caption_extension", "dataset_base_path"), "without --train_data_dir (they say how an "
                       "image folder or metadata file is read): drop them")
    if not (c.train_data_dir or c.dataset_name):
        refuse_changed(c, ("image_column", "caption_column"), "for shards, file lists and caches, which name their "
                       "own fields: they apply to --train_data_dir metadata and --dataset_name")
    if c.cache_dir:
        refuse_changed(c, ("vae_encode_batch_size",), "with --cache_dir: the latents are cached, nothing is encoded")
    need(not c.cast_teacher_unet or c.mixed_precision != "no",
         "--cast_teacher_unet casts the frozen teacher to the mixed-precision dtype, and --mixed_precision is no: "
         "add --mixed_precision fp16 or bf16, or drop --cast_teacher_unet")
    need(not (c.teacher_revision and _is_local(c.pretrained_teacher_model)),
         f"--teacher_revision selects a hub revision, and {c.pretrained_teacher_model} is a local folder: drop it")
    # Values torch, numpy or the loop would only reject with a traceback, at the first step or later.
    need(c.adam_epsilon >= 0, f"--adam_epsilon must be >= 0 (typically 1e-8), got {c.adam_epsilon}")
    need(0 <= c.adam_beta1 < 1 and 0 <= c.adam_beta2 < 1,
         f"--adam_beta1 and --adam_beta2 must be in [0, 1) (typically 0.9 and 0.999), got {c.adam_beta1} and "
         f"{c.adam_beta2}")
    need(c.adam_weight_decay >= 0, f"--adam_weight_decay must be >= 0 (0 disables it), got {c.adam_weight_decay}")
    need(0 <= c.seed < 2**32, f"--seed must be in [0, 2**32) (numpy's seed range), got {c.seed}")
    need(c.max_train_samples is None or c.max_train_samples >= 1,
         f"--max_train_samples must be >= 1 (leave it unset for all samples), got {c.max_train_samples}")
    need(c.validation_steps == 0 or (bool(c.validation_prompts) and all(p.strip() for p in c.validation_prompts)),
         "--validation_prompts needs at least one non-empty prompt (several separated by '|'), or turn "
         "validation off with --validation_steps 0")
    need(bool(c.output_dir.strip()), "--output_dir must name a folder (an empty one would write into the "
         "current directory)")
    for key in ("pretrained_teacher_model", "train_data_dir", "pretrained_vae_model_name_or_path"):
        other = getattr(c, key)
        if other and Path(other).expanduser().exists() and \
                Path(other).expanduser().resolve() == Path(c.output_dir).expanduser().resolve():
            raise ConfigError(f"--output_dir {c.output_dir} is the --{key} folder: the run would write its "
                              "checkpoints and student over it; choose another --output_dir")
    # (bitsandbytes and xformers are judged with the device: training/preflight.py check_packages)
    for on, module, extra in ((c.report_to == "wandb", "wandb", "--report_to wandb needs wandb: pip install "
                               "'fewstep[wandb]'"),):
        need(not on or installed(module), extra)
    need(0 < c.max_bad_fraction <= 1, "--max_bad_fraction must be in (0, 1]")
    sources = [s for s in (c.train_data_dir, c.train_shards_path_or_url, c.dataset_name, c.file_list, c.cache_dir) if s]
    need(len(sources) <= 1, "give one data source: --train_data_dir, --train_shards_path_or_url, --dataset_name, "
         "--file_list or --cache_dir")
    need(not c.data_resampling or bool(c.train_shards_path_or_url or c.file_list),
         "--data_resampling applies to streamed data: --train_shards_path_or_url or --file_list")
    from diffusers.optimization import SchedulerType

    # piecewise_constant needs step rules, which no option gives
    names = [s.value for s in SchedulerType if s.value != "piecewise_constant"]
    need(c.lr_scheduler in names, f"--lr_scheduler {c.lr_scheduler!r} is not one of {', '.join(names)}")
    # diffusers' "constant" ignores warmup (lr at full value from step 0): a warmup given with it is refused,
    # and the default warmup (diffusers' scripts: 500) applies only to schedules that have one.
    if c.lr_warmup_steps is None:
        c.lr_warmup_steps = 0 if c.lr_scheduler == "constant" else 500
    need(c.lr_warmup_steps >= 0, "--lr_warmup_steps must be >= 0")
    need(c.lr_warmup_steps == 0 or c.lr_scheduler != "constant",
         f"--lr_warmup_steps {c.lr_warmup_steps} has no effect with --lr_scheduler constant, which has no warmup: "
         "use --lr_scheduler constant_with_warmup (or drop --lr_warmup_steps)")


def validate_sharding(c: TrainConfig) -> None:
    """--fsdp and its options, the accelerate launcher's FSDP settings merged in first (an ``accelerate
    launch`` with an FSDP config turns --fsdp on: training/sharding.py reads it)."""
    if c.fsdp_frozen not in ("auto", "shard", "replicate"):
        raise ConfigError(f"--fsdp_frozen must be auto, shard or replicate, got {c.fsdp_frozen!r}")
    if c.rng_streams not in ("auto", "rank", "batch"):
        raise ConfigError(f"--rng_streams must be auto, rank or batch, got {c.rng_streams!r}")
    if c.fsdp_wrap is not None and not c.fsdp_wrap:
        raise ConfigError("--fsdp_wrap must name at least one module class (or be left unset)")
    apply_launcher_settings(c)
    if not c.fsdp:
        refuse_changed(c, ("fsdp_frozen", "fsdp_offload", "fsdp_reshard_after_forward", "fsdp_wrap"),
                       "without --fsdp (they configure sharding): add --fsdp true, or drop them")
        return
    why = {"use_8bit_adam": (c.use_8bit_adam, "bitsandbytes' optimizer does not step sharded (DTensor) "
                             "parameters; drop --use_8bit_adam (sharding already divides the AdamW state by "
                             "the number of processes)"),
           "mixed_precision fp16": (c.mixed_precision == "fp16", "fp16 needs a loss scaler whose overflow "
                                    "check spans every shard, which fewstep does not run under --fsdp; use "
                                    "--mixed_precision bf16 (no loss scaling needed)"),
           "torch_compile": (c.torch_compile, "compiling sharded networks is not verified here; drop "
                             "--torch_compile"),
           "channels_last": (c.channels_last, "sharded weights are gathered into contiguous buffers, so the "
                             "layout would not hold; drop --channels_last")}
    for flag, (on, msg) in why.items():
        if on:
            raise ConfigError(f"--fsdp with --{flag}: {msg}")
    if c.fsdp_offload and not has_gpu():
        raise ConfigError("--fsdp_offload moves the shards from the GPU into CPU memory; without a GPU they are in "
                          "CPU memory already: drop it")


def launcher_fsdp() -> Any | None:
    """The FSDP settings of an ``accelerate launch`` with an FSDP config (accelerate's plugin, parsed from
    the environment the launcher sets), or None."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin()


def apply_launcher_settings(c) -> None:
    """Turn ``--fsdp`` on from an accelerate FSDP config and take its settings; a setting fewstep cannot
    honour, or one given differently on the command line, is refused (nothing in a config is ignored)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        if c.fsdp:
            raise ConfigError("--fsdp and an accelerate DeepSpeed config exclude each other: launch with "
                              "configs/accelerate/fsdp.yaml, or drop --fsdp")
        apply_deepspeed_settings(c)
        return
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    where = "the accelerate config (fsdp_config)"
    version = os.environ.get("FSDP_VERSION", "1")  # (accelerate's default); read before the plugin, whose
    if version != "2":  # FSDP1 form may ask for a device this machine lacks
        raise ConfigError(f"{where} asks for FSDP version {version}; fewstep shards with FSDP2: set "
                          "fsdp_version: 2 (see configs/accelerate/fsdp.yaml)")
    plugin = launcher_fsdp()
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.distributed.fsdp.fully_sharded_data_parallel import StateDictType

    if plugin.state_dict_type not in (None, StateDictType.SHARDED_STATE_DICT):
        raise ConfigError(f"{where}: fsdp_state_dict_type {plugin.state_dict_type.name}; fewstep's checkpoints "
                          "under FSDP are sharded (each rank writes its part; `fewstep export --from_checkpoint` "
                          "writes the full weights): set fsdp_state_dict_type: SHARDED_STATE_DICT")
    if plugin.cpu_ram_efficient_loading:
        raise ConfigError(f"{where}: fsdp_cpu_ram_efficient_loading true; every fewstep process loads the teacher "
                          "itself: set it to false")
    names = getattr(plugin, "transformer_cls_names_to_wrap", None)
    policy = getattr(plugin.auto_wrap_policy, "__name__", str(plugin.auto_wrap_policy))
    if plugin.auto_wrap_policy is not None and "size_based" in policy:
        raise ConfigError(f"{where}: fsdp_auto_wrap_policy SIZE_BASED_WRAP; fewstep shards blocks holding >= 1 % "
                          "of a network (the default, fsdp_auto_wrap_policy NO_WRAP) or the classes of "
                          "TRANSFORMER_BASED_WRAP with fsdp_transformer_layer_cls_to_wrap")
    offload = isinstance(plugin.cpu_offload, CPUOffloadPolicy)
    wanted = {"fsdp_offload": offload, "fsdp_reshard_after_forward": bool(plugin.reshard_after_forward)}
    if names and plugin.auto_wrap_policy is not None:
        wanted["fsdp_wrap"] = list(names)
    default = TrainConfig()
    for key, value in wanted.items():
        given = getattr(c, key)
        if given != getattr(default, key) and given != value:
            raise ConfigError(f"--{key} {given!r} contradicts {where}, which gives {value!r}: drop one of them")
        setattr(c, key, value)
    if plugin.activation_checkpointing:
        c.gradient_checkpointing = True  # (the networks' own checkpointing: diffusers' blocks)
    c.fsdp = True


def launcher_deepspeed() -> tuple[str, dict[str, Any]]:
    """Where an ``accelerate launch`` DeepSpeed config lives and the settings of it that fewstep reads:
    the DeepSpeed JSON (``deepspeed_config_file``) or the yaml's ``deepspeed_config`` keys, which the
    launcher passes on as environment variables. Values "auto" (filled from fewstep's) are left out."""
    env = os.environ
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path and path.lower() != "none":
        try:
            ds = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"the DeepSpeed config {path} cannot be read: {e}") from None
        zero = ds.get("zero_optimization") or {}
        raw = {"gradient_accumulation_steps": ds.get("gradient_accumulation_steps"),
               "max_grad_norm": ds.get("gradient_clipping"),
               "train_batch_size": ds.get("train_micro_batch_size_per_gpu"),
               "fp16": (ds.get("fp16") or {}).get("enabled"), "bf16": (ds.get("bf16") or {}).get("enabled"),
               "zero_stage": zero.get("stage")}
        where = f"the DeepSpeed config {path}"
    else:
        raw = {"gradient_accumulation_steps": env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
               "max_grad_norm": env.get("ACCELERATE_GRADIENT_CLIPPING"),
               "zero_stage": env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")}
        where = "the accelerate config (deepspeed_config)"
    raw["zero3_init"] = env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "false").lower() == "true"
    out = {k: v for k, v in raw.items() if v is not None and str(v).lower() not in ("auto", "none")}
    for k in ("gradient_accumulation_steps", "train_batch_size", "zero_stage"):
        if k in out:
            out[k] = int(out[k])
    if "max_grad_norm" in out:
        out["max_grad_norm"] = float(out["max_grad_norm"])
    return where, out


def apply_deepspeed_settings(c) -> None:
    """The settings of an accelerate DeepSpeed config become fewstep's (DeepSpeed's engine applies them:
    it steps after the config's number of micro-batches, clips at its gradient_clipping); one given
    differently on the command line, or one fewstep cannot honour, is refused."""
    where, ds = launcher_deepspeed()
    if ds.get("zero3_init"):
        raise ConfigError(f"{where}: zero3_init_flag true; fewstep builds its networks whole in every process (the "
                          "frozen teacher and text encoders too, which no DeepSpeed engine would gather) and the "
                          "engine partitions the trained one: set zero3_init_flag: false")
    if ds.get("zero_stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: ZeRO stage {ds['zero_stage']} does not exist (0-3)")
    for dtype in ("fp16", "bf16"):
        on = str(ds.get(dtype, "")).lower()
        if on in ("true", "false") and (on == "true") != (c.mixed_precision == dtype):
            raise ConfigError(f"{where} turns {dtype} {'on' if on == 'true' else 'off'}, and --mixed_precision is "
                              f"{c.mixed_precision}: set {dtype}.enabled to \"auto\" (fewstep's --mixed_precision "
                              "decides) or make them agree")
    default = TrainConfig()
    for key in ("gradient_accumulation_steps", "max_grad_norm", "train_batch_size"):
        if key not in ds:
            continue
        given, value = getattr(c, key), ds[key]
        if given != getattr(default, key) and given != value:
            raise ConfigError(f"--{key} {given!r} contradicts {where}, which gives {value!r} (DeepSpeed's engine "
                              "applies its own): drop one of them, or set it to \"auto\" there")
        setattr(c, key, value)


TrainConfig.validate = validate_train  # type: ignore[attr-defined]


def validate_habits(c: TrainConfig) -> None:
    """Checks of the keys that come from other tools' habits (PaddleMIX, DiffSynth-Studio, kohya, the hub)."""
    if not c.do_train:
        raise ConfigError("--do_train false: `fewstep distill` always trains; to check a run without training "
                          "use --dry_run")
    for name, value in (("--logging_steps", c.logging_steps), ("--dataset_repeat", c.dataset_repeat)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1")
    if c.num_train_epochs is not None and c.num_train_epochs < 1:
        raise ConfigError("--num_train_epochs must be >= 1")
    if c.model_max_length is not None and c.model_max_length < 1:
        raise ConfigError("--model_max_length must be >= 1")
    if c.caption_extension is not None and not c.caption_extension.strip(". "):
        raise ConfigError("--caption_extension needs a file extension, e.g. .caption")
    if c.hub_model_id is not None and (not c.hub_model_id.strip() or c.hub_model_id.count("/") > 1):
        raise ConfigError(f"--hub_model_id {c.hub_model_id!r}: give a repo id, NAME or OWNER/NAME")
    if c.report_to == "none":
        refuse_changed(c, ("tracker_project_name",), "with --report_to none (no tracker): drop it")
    if not c.train_data_dir:
        refuse_changed(c, ("caption_extension", "dataset_base_path"), "without --train_data_dir (they "
                       "locate an image folder's captions and a metadata file's images): drop them")
    if (c.hub_model_id or c.hub_token) and not c.push_to_hub:
        raise ConfigError("--hub_model_id / --hub_token only apply with --push_to_hub (or later: fewstep push OUT "
                          "--hub_model_id ID)")


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
