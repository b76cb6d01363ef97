"""From what the user typed to a resolved run: presets, ``--config`` YAML, command-line flags, epochs.

Layers, lowest first: a preset (``--preset NAME``, a file under ``configs/<method>/``), the ``--config``
YAML, the command line. :func:`parse_run` merges them and binds the result with
:func:`fewstep.config.resolve`; every command that trains (``distill``, ``train-teacher``, ``cache``,
``demo``, ``compare``) goes through it or through :func:`resolve_run`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import (
    ALIASES,
    ConfigError,
    RunSpec,
    TrainConfig,
    known_keys,
    load_yaml,
    parse_cli_pairs,
    resolve,
)

log = logging.getLogger("fewstep")

# Presets ship beside the package in a source checkout (configs/ at the repository root);
# FEWSTEP_CONFIGS points elsewhere (an installed wheel, a site's own presets).
CONFIGS = Path(os.environ.get("FEWSTEP_CONFIGS") or Path(__file__).resolve().parents[2] / "configs")
PRESET_META = "preset"  # the mapping in a preset file that describes it (not a run key)


def method_configs() -> dict[str, type]:
    """``--method`` name → its method class (its settings: ``.Config``), for every registered method: what
    config resolution binds a run's keys to."""
    from .methods import REGISTRY

    return dict(REGISTRY)


def method_tasks() -> dict[str, str]:
    """DiffSynth-Studio ``--task`` names → fewstep methods, as each method declares them (``task_names``)."""
    from .methods import REGISTRY

    return {t: name for name, cls in REGISTRY.items() for t in getattr(cls, "task_names", ())}


@dataclass
class Preset:
    name: str  # "<method>/<file stem>", e.g. "lcm/sd15"
    path: Path
    family: str | None  # the teacher family it was written for (bundle.family), checked against the teacher
    source: str  # where the settings come from
    description: str
    keys: dict[str, Any]


def list_presets(root: Path | None = None) -> list[Preset]:
    root = Path(root or CONFIGS)
    out = []
    for p in sorted(root.glob("*/*.yaml")):
        if p.parent.name == "accelerate":  # launch configs, not presets
            continue
        data = load_yaml(str(p))
        meta = data.pop(PRESET_META, None)
        if not isinstance(meta, dict):
            continue
        out.append(Preset(f"{p.parent.name}/{p.stem}", p, meta.get("family"), str(meta.get("source", "")),
                          str(meta.get("description", "")), data))
    return out


def load_preset(name: str) -> Preset:
    presets = {p.name: p for p in list_presets()}
    if name not in presets:
        import difflib

        hint = difflib.get_close_matches(str(name), list(presets), n=1)
        raise ConfigError(f"--preset {name}: no such preset" + (f" (did you mean {hint[0]}?)" if hint else "")
                          + f"; `fewstep presets` lists them ({', '.join(presets) or f'none in {CONFIGS}'})")
    return presets[name]


def check_preset_family(cfg: TrainConfig, family: str | None) -> None:
    """A preset's settings are those of one teacher family (guidance range, learning rate, timesteps)."""
    if not cfg.preset or family is None:
        return
    want = load_preset(cfg.preset).family
    if want and want != family:
        raise ConfigError(f"--preset {cfg.preset} holds the settings for {want} teachers; "
                          f"{cfg.pretrained_teacher_model} is a {family} teacher: pick that family's preset "
                          "(`fewstep presets`)")


def _canonical(raw: dict[str, Any]) -> set[str]:
    return {ALIASES.get(str(k).replace("-", "_"), str(k).replace("-", "_")) for k in raw}


def resolve_run(user: dict[str, Any], require_teacher: bool = True) -> RunSpec:
    """Bind ``user`` keys (YAML and command line merged) on top of their preset; epochs → steps."""
    raw: dict[str, Any] = {}
    preset = user.get("preset")
    if preset is not None:
        if not isinstance(preset, str):
            raise ConfigError(f"--preset expects a name, got {preset!r}")
        raw.update(load_preset(preset).keys)
    raw.update(user)
    from .methods import REGISTRY

    spec = resolve(raw, REGISTRY, method_tasks=method_tasks())

    if require_teacher and REGISTRY[spec.train.method].needs_teacher and not spec.train.pretrained_teacher_model:
        raise ConfigError("--pretrained_teacher_model is required (a diffusers folder or hub id)")
    apply_epochs(spec, explicit_steps="max_train_steps" in _canonical(user))
    return spec


def parse_run(argv: list[str]) -> RunSpec:
    """YAML (--config) first, command-line flags on top, both on the preset; returns a validated RunSpec."""
    mconfigs = method_configs()
    bool_keys = {f.name for c in [TrainConfig, *(m.Config for m in mconfigs.values())] for f in dataclasses.fields(c)
                 if f.type in ("bool", bool, "bool | None")}
    bool_keys |= {a for a, k in ALIASES.items() if k in bool_keys}
    user: dict = {}
    argv = [x for a in argv for x in (a.split("=", 1) if a.startswith("--config=") else [a])]
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a YAML file")
        user.update(load_yaml(argv[i + 1]))
        argv = argv[:i] + argv[i + 2:]
    user.update(parse_cli_pairs(argv, bool_keys, known_keys(mconfigs)))
    return resolve_run(user)


def apply_epochs(spec: RunSpec, explicit_steps: bool) -> None:
    """``--num_train_epochs`` (and DiffSynth's ``--dataset_repeat``) → ``--max_train_steps``, as diffusers'
    scripts do: an explicit ``--max_train_steps`` wins. One epoch is one pass over the data in full
    batches of ``--train_batch_size`` × processes; an optimizer step takes ``--gradient_accumulation_steps``
    of them."""
    c = spec.train
    if c.num_train_epochs is None and c.dataset_repeat == 1:
        return
    passes = (c.num_train_epochs or 1) * c.dataset_repeat
    if explicit_steps:
        log.warning("--max_train_steps %d decides the run's length; %d passes over the data "
                    "(--num_train_epochs x --dataset_repeat) are not used", c.max_train_steps, passes)
        return
    from .data import build_dataset

    ds = build_dataset(c)
    if hasattr(ds, "__len__"):
        n = len(ds)
    elif c.max_train_samples:
        n = c.max_train_samples
    else:
        raise ConfigError("--num_train_epochs needs a data set of known size; this stream has none: give "
                          "--max_train_steps, or --max_train_samples")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = n // (c.train_batch_size * world)
    if batches == 0:
        return  # fewer samples than one batch: the run's own check refuses it, naming the fix
    c.max_train_steps = max(1, math.ceil(passes * batches / c.gradient_accumulation_steps))
    log.info("%d passes over %d samples (%d batches each) = %d optimizer steps", passes, n, batches,
             c.max_train_steps)
