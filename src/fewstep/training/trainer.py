"""The method-agnostic training loop on accelerate.

It knows trainable groups, optimizers, phases, accumulation, clipping, mixed precision, logging,
validation, checkpoints, signals and non-finite losses — and nothing about any method's math.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, RunSpec
from ..data import build_dataset, collate
from ..export import write_model_card
from ..logs import quiet_libraries
from ..models.bundle import weight_dtype_of  # noqa: F401  (re-exported)
from . import zero
from .checkpoint import (
    TRAINER_RESUME_KEYS,
    CheckpointError,
    ResumeMismatch,
    agree,
    check_resume_settings,
    checkpoint_bytes,
    clear_previous_run,
    load_checkpoint,
    recover,
    resolve_resume,
    run_info,
    save_checkpoint,
    write_state,
)
from .preflight import apply_text_length, check_run, check_teacher, wandb_reachable
from .seeding import global_position, relayout, reseed
from .sharding import BuildProxy, Sharding, build_device, plain, rng_mode
from .speed import speed_setup

log = logging.getLogger("fewstep")


# Optimizer group settings a restored checkpoint would override, by the option that sets them.
_HYPER = {"initial_lr": "learning rate (--learning_rate or the method's own)", "betas": "betas (--adam_beta1/2)",
          "eps": "--adam_epsilon", "weight_decay": "--adam_weight_decay", "fused": "--adam_impl (fused)",
          "foreach": "--adam_impl (foreach)"}


class TrainState:
    """Counters the checkpoint must restore: optimizer steps done and the data position."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch, self.nan_steps, self.skipped = 0, 0, 0, 0, {}
        self.samples_seen, self.bad_example = 0, None
        self.nonfinite = {"loss": 0, "grad": 0}  # skipped steps by cause, over the whole run
        # Optimizer steps that were not skipped, and the last of them: an export needs at least one, and
        # "the last good checkpoint" is one written right after such a step.
        self.good_steps, self.last_good_step = 0, 0
        # Samples the optimizer steps trained on (all ranks, all micro-batches) and the last step's batch:
        # the effective batch, which the log shows per step.
        self.samples_trained, self.last_batch = 0, 0
        # Streamed data: items of the current epoch consumed per rank and loader worker, so a resumed
        # run continues each worker's stream exactly (see data/stream.py).
        self.stream_pos: dict[int, dict[int, int]] = {}
        # How the global batch was laid out when the checkpoint was written (processes, per-device batch,
        # accumulation, random streams): a resume on another number of processes converts the data
        # position from it (training/seeding.py).
        self.layout: dict | None = None

    def state_dict(self):
        return dict(vars(self))

    def load_state_dict(self, d):
        vars(self).update(d)
        if "good_steps" not in d:  # a checkpoint from before these counters: derived from the others
            self.good_steps = max(0, self.step - sum(self.nonfinite.values()))
            self.last_good_step = self.step if self.nan_steps == 0 else 0


class StopRequested:
    """SIGTERM/SIGINT: the first sets a flag, which the per-step all-reduce carries to every rank; all
    ranks then save one checkpoint at the same step boundary and exit with 128 + the signal number. A
    second signal changes nothing (the save it might interrupt is what the user wants kept); a third
    aborts without saving (the atomic save leaves the previous checkpoint intact)."""

    ABORT_AFTER = 3

    def __init__(self):
        self.signum = None
        self.count = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        self.count += 1
        if self.count >= self.ABORT_AFTER:
            # Die of the signal itself, as without a handler: no traceback, no half-written checkpoint
            # under a final name (a save in progress stays a temporary folder that the next start removes).
            log.warning("signal %s received a third time: aborting without saving", signum)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is not None:
            log.warning("signal %s received again: the checkpoint is still written at the end of this step "
                        "(a third signal aborts without saving)", signum)
            return
        self.signum = signum
        log.warning("signal %s received: finishing this step, saving a checkpoint, then exiting", signum)

    def code(self) -> tuple[float, float]:
        """(SIGTERM seen, SIGINT or another signal seen) for the all-reduce."""
        return (1.0 if self.signum == signal.SIGTERM else 0.0,
                1.0 if self.signum is not None and self.signum != signal.SIGTERM else 0.0)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch) alone, so a resumed run can rebuild the
    exact order and skip the batches already seen (accelerate shards the batches across ranks)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        # Indices carry the epoch (epoch · n + i) so that persistent data-loader workers, which hold
        # their own copy of the data set, still seed per-epoch augmentations correctly.
        return iter((torch.randperm(self.n, generator=g) + self.epoch * self.n).tolist())


def make_optimizer(cfg, params, lr):
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--use_8bit_adam needs bitsandbytes: pip install 'fewstep[8bit]' (CUDA only)") from None
        cls = bnb.optim.AdamW8bit
        kw = {}
    else:
        cls = torch.optim.AdamW
        # One fused kernel per parameter group on CUDA; the same update math as the foreach kernels.
        fused = cfg.adam_impl == "fused" or (cfg.adam_impl == "auto" and torch.cuda.is_available())
        kw = {"fused": True} if fused else {"foreach": True}
    return cls(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
               eps=cfg.adam_epsilon, **kw)


def validation_rows(requested: list[int], trained: tuple[int, int] | None) -> list[int]:
    """The step counts of a validation grid: each requested one clamped into the range the student is
    trained for (``Method.trained_steps``), duplicates dropped, so no row shows sampling it never saw."""
    if trained is None:
        return list(requested)
    lo, hi = trained
    return list(dict.fromkeys(min(max(n, lo), hi) for n in requested))


def check_finite_weights(bundle, *extra_roots) -> None:
    """Refuse a teacher with a NaN/inf weight, naming the file it came from: every step of such a run
    would be skipped (or train towards NaN), so it is caught when the teacher loads, not at step 1."""
    for attr, module in bundle.modules().items():
        for name, t in module.named_parameters():  # (buffers may hold -inf masks on purpose)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                n = int((~torch.isfinite(t)).sum())
                roots = [Path(bundle.root) / attr, Path(bundle.root)] if getattr(bundle, "root", None) else []
                where = _weight_file(name, [*roots, *[Path(r) for r in extra_roots if r]])
                raise ConfigError(
                    f"the teacher's {attr} holds {n} non-finite value(s) (NaN/inf) in {name!r}"
                    f"{f', read from {where}' if where else ''}: a damaged or wrongly converted weight file. "
                    "Re-download or re-convert it; training on it would only skip steps or learn NaN")


def _weight_file(key: str, roots: list[Path]) -> Path | None:
    """The weights file under ``roots`` whose tensor ``key`` is not finite (only run on failure)."""
    from safetensors import safe_open

    for root in roots:
        if not root.is_dir():
            continue
        for f in sorted(root.rglob("*.safetensors")):
            try:
                with safe_open(str(f), framework="pt") as st:
                    if key in st.keys() and not bool(torch.isfinite(st.get_tensor(key).float()).all()):
                        return f
            except Exception:  # noqa: BLE001 - not a readable weights file: look further
                continue
    return None


def image_grid(rows: list[torch.Tensor]) -> np.ndarray:
    """Rows of (n, 3, H, W) images in [0, 1] → one uint8 HWC grid."""
    strips = [torch.cat(list(r), dim=-1) for r in rows]
    grid = torch.cat(strips, dim=-2).clamp(0, 1)
    return (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def build_accelerator(cfg, out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

    # accelerate keeps one process-wide state and refuses a second Accelerator with another mixed
    # precision; several runs in one process (benchmarks, the demo, tests) each get a fresh one.
    # The distributed PartialState (ranks, process group) is kept.
    AcceleratorState._reset_state()
    log_with = None if cfg.report_to == "none" else cfg.report_to
    if log_with in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError("--report_to wandb needs wandb: pip install 'fewstep[wandb]'") from None
        if not os.environ.get("WANDB_MODE") and not wandb_reachable():
            # No network: wandb's offline mode writes the run under OUT/logs/wandb for `wandb sync` later.
            os.environ["WANDB_MODE"] = "offline"
            print(f"wandb: the server cannot be reached; logging offline to {out / cfg.logging_dir}/wandb (upload "
                  f"later with `wandb sync {out / cfg.logging_dir}/wandb/offline-run-*`)", file=sys.stderr)
    from accelerate.utils import DistributedDataParallelKwargs

    handlers = [DistributedDataParallelKwargs(find_unused_parameters=True)] if cfg.find_unused_parameters else []
    handlers += zero.process_group_kwargs()
    acc = Accelerator(
        # On a machine without CUDA, cpu=True lets several processes started by torchrun form a gloo
        # process group (MULTI_CPU); without it each would run alone and all would write OUT. Not under
        # DeepSpeed, which cpu=True would turn off (training/zero.py).
        cpu=not torch.cuda.is_available() and not zero.launched(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
        kwargs_handlers=handlers,
    )
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc.distributed_type != DistributedType.FSDP:
        # accelerate turns FSDP on only for GPU-like devices; on CPU processes it would silently run DDP.
        # The config turned --fsdp on (config.apply_launcher_settings): fewstep shards the networks itself.
        log.warning("an FSDP accelerate config was given; accelerate runs FSDP only on GPUs (%s here), so "
                    "fewstep shards the networks itself (--fsdp: training/sharding.py)%s",
                    acc.distributed_type.value, "" if cfg.fsdp else " — but --fsdp is off: whole model on every rank")
    zero.configure(acc, cfg)
    return acc


class Trainer:
    """Runs ``spec.method_cls`` (the method class config resolution bound the run to) over the data."""

    def __init__(self, spec: RunSpec, bundle=None):
        from accelerate.utils import set_seed

        if spec.teacher_family is None and getattr(spec.method_cls, "needs_teacher", False):
            # A spec resolved without its teacher's family (built in Python, not by the command line):
            # resolve the family's recipe defaults now, before anything reads the settings.
            from ..models.bundle import teacher_family

            t = spec.train
            spec = spec.with_family(bundle.family if bundle is not None else
                                    teacher_family(t.pretrained_teacher_model, t.teacher_revision))
        self.spec, cfg = spec, spec.train
        self.cfg = cfg
        # What the run would refuse, before anything is loaded or written (the same checks as --dry_run).
        self.preflight = check_run(spec, order=lambda n, seed: iter(EpochSampler(n, seed)))
        self.resume_hint = "the same command plus --resume_from_checkpoint latest"  # (the demo says its own)
        self.on_save: list = []  # callbacks (step, training seconds so far, checkpoint path), main process
        import uuid

        # Which run this is (a resume continues the run it loads: rotation removes only this run's checkpoints),
        # and the wall-clock spent in its training loop (steps and data; not validation, saving, loading).
        self.run_id, self.train_seconds = uuid.uuid4().hex, 0.0
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.acc = acc = build_accelerator(cfg, self.out)
        # The process group, held here so that it outlives the run's DDP wrappers (see release()).
        self._world = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
        logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        quiet_libraries()  # accelerate logs ~8 INFO lines per checkpoint; fewstep writes one
        # A different noise stream per rank. Under --fsdp every rank builds the networks from rank 0's
        # stream first (random initialisations, LoRA's A matrices, must agree: each rank keeps its own
        # shard of what it built, where DDP broadcasts rank 0's weights), and takes its own stream after.
        set_seed(cfg.seed, device_specific=not cfg.fsdp)
        if torch.cuda.is_available():
            # Training shapes are fixed (one resolution, one batch size): autotuning pays once.
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        self.method_cls = method_cls = spec.method_cls
        for line in spec.family_report():
            log.info(line)
        if bundle is None:  # settings × the teacher's configs, before its weights load
            check_teacher(spec, method_cls.preflight(cfg, spec.method))
        self.bundle = bundle or method_cls.make_bundle(cfg, spec.method)
        check_teacher(spec, self.bundle)
        apply_text_length(cfg, self.bundle)
        if method_cls.needs_teacher and bundle is None:
            check_finite_weights(self.bundle, cfg.pretrained_vae_model_name_or_path)
        if cfg.enable_xformers_memory_efficient_attention:  # (the package was checked before any model loaded)
            self.bundle.denoiser.enable_xformers_memory_efficient_attention()

        # The method moves and casts what it holds frozen; trainables stay fp32 (autocast does the rest).
        # Under --fsdp on GPUs it builds in CPU memory, and sharding moves each block's shard to the GPU.
        build = BuildProxy(acc, build_device(acc)) if cfg.fsdp and acc.device.type != "cpu" else acc
        self.method = method_cls(cfg, spec.method, self.bundle, build)
        self.method.accelerator = acc
        if cfg.fsdp and acc.process_index != 0:
            set_seed(cfg.seed, device_specific=True)
        speed_setup(cfg, self.method, self.bundle, acc.device)
        groups = self.method.groups()
        zero.check_groups(acc, groups)
        if cfg.enable_xformers_memory_efficient_attention:
            for g in groups.values():
                if hasattr(g.module, "enable_xformers_memory_efficient_attention"):
                    g.module.enable_xformers_memory_efficient_attention()
        self.sharding: Sharding | None = None
        if cfg.fsdp:  # (training/sharding.py) the groups' parameters are the sharded ones afterwards
            self.sharding = Sharding(cfg, acc)
            self.sharding.shard(self.method, groups)
            self.sharding.relocate(self.method, acc.device)
            groups = self.method.groups()
        self.rng = rng_mode(cfg)
        from diffusers.optimization import get_scheduler

        self.names = list(groups)
        self.opts, self.scheds, self.params = {}, {}, {}
        for name, g in groups.items():
            params = g.params or [p for p in g.module.parameters() if p.requires_grad]
            self.params[name] = params
            self.opts[name] = make_optimizer(cfg, params, g.lr or cfg.learning_rate)
            # ---- learning-rate schedules: each group's runs on the clock its method declares
            # (Method.schedule_ticks / schedule_length, e.g. DMD2's iterations); see _tick_schedules.
            self.scheds[name] = get_scheduler(cfg.lr_scheduler, self.opts[name], num_warmup_steps=cfg.lr_warmup_steps,
                                              num_training_steps=self.method.schedule_length(name))

        self.dataset = build_dataset(cfg)
        # Bad samples are replaced (map-style) or passed over (streams), so batches keep their size.
        for flag in ("replace_bad", "carry_bad"):
            if hasattr(self.dataset, flag):
                setattr(self.dataset, flag, True)
        if hasattr(self.dataset, "set_rank"):
            self.dataset.set_rank(acc.process_index, acc.num_processes)
        is_map = not isinstance(self.dataset, torch.utils.data.IterableDataset)
        # The loader's own generator: creating an iterator must not draw from the global RNG,
        # or a resumed run would see different noise than an uninterrupted one.
        need = cfg.train_batch_size * acc.num_processes
        if is_map and len(self.dataset) < need:  # drop_last would drop every batch of every epoch
            raise ConfigError(
                f"the data set holds {len(self.dataset)} samples, fewer than one batch of --train_batch_size "
                f"{cfg.train_batch_size} per process x {acc.num_processes} process(es) = {need}, so every batch "
                f"would be dropped (incomplete batches are): lower --train_batch_size to at most "
                f"{len(self.dataset) // acc.num_processes} or add data")
        self.sampler = EpochSampler(len(self.dataset), cfg.seed) if is_map else None
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=cfg.train_batch_size, sampler=self.sampler, collate_fn=collate,
            num_workers=cfg.dataloader_num_workers, drop_last=is_map,
            # Streamed data sets learn their epoch and resume position in the main process; workers
            # must be re-created per epoch to see them.
            persistent_workers=cfg.dataloader_num_workers > 0 and is_map,
            generator=torch.Generator().manual_seed(cfg.seed), pin_memory=torch.cuda.is_available())

        k = len(self.names)
        # (before the DeepSpeed engine casts them: what an export writes, training/zero.py)
        self.built_dtypes = {n: zero.dtypes(groups[n].module) for n in self.names} if zero.stage(acc) else {}
        if self.sharding is None:
            prepared = acc.prepare(*[groups[n].module for n in self.names],
                                   *[self.opts[n] for n in self.names], *[self.scheds[n] for n in self.names])
        else:
            # Sharded networks are not accelerate's to wrap (no DDP) and their state is not its to save (the
            # sharded checkpoint holds networks and optimizers); it still saves schedules and RNG states.
            scheds = acc.prepare(*[self.scheds[n] for n in self.names])
            prepared = [groups[n].module for n in self.names] + [self.opts[n] for n in self.names] + \
                (list(scheds) if k > 1 else [scheds])
        self.method.bind(dict(zip(self.names, prepared[:k])))
        self.opts = dict(zip(self.names, prepared[k:2 * k]))
        self.scheds = dict(zip(self.names, prepared[2 * k:]))
        self.modules = dict(zip(self.names, prepared[:k]))
        # Iterable (streamed) data is split per rank by the data set itself, not by accelerate.
        self.loader = acc.prepare_data_loader(loader) if is_map else loader
        self.is_map = is_map

        self.state = TrainState()
        self._host_logs: dict[str, float] = {}
        # fewstep's own state is saved by name as JSON + safetensors (training/checkpoint.py), not through
        # accelerate's register_for_checkpointing, whose files are pickles read back with full unpickling.
        self.objects = dict(self.method.stateful())
        self.stop = StopRequested()
        self.stopped_by: int | None = None  # the signal that stopped the run (after its checkpoint was saved)
        self._stop_agreed = 0  # the signal every rank agreed to stop on, from the last step's all-reduce
        self._saved_step = -1
        self.last_good_ckpt: Path | None = None

    # ---- data --------------------------------------------------------------------------------
    def _epoch_iter(self, skip: int = 0):
        epoch = self.state.epoch
        self.dataset.set_epoch(epoch)
        if not self.is_map and hasattr(self.dataset, "set_resume"):
            # Each worker skips what it had served in this epoch; a new epoch starts from nothing.
            pos = self.state.stream_pos.get(self.acc.process_index, {}) if skip else {}
            self.dataset.set_resume(pos, self.state.step)
        loader = self.acc.skip_first_batches(self.loader, skip) if (skip and self.is_map) else self.loader
        # accelerate's loaders re-set the sampler's epoch from their own iteration counter at every
        # iter(); tell them the true epoch, or a resumed run would replay epoch 0's order.
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
        return iter(loader)

    def _next_batch(self):
        st = self.state
        while True:
            batch = next(self._it, None)
            if batch is None:
                if st.batch_in_epoch == 0 or st.samples_seen == sum(st.skipped.values()):
                    raise SystemExit(self._bad_data_message("the data source yielded no usable sample"))
                st.epoch += 1
                st.batch_in_epoch = 0
                st.stream_pos = {}
                self._it = self._epoch_iter()
                continue
            st.batch_in_epoch += 1
            n_items = batch["positions"]  # data positions this batch consumed (bad samples included)
            st.samples_seen += n_items
            if "worker" in batch:
                mine = st.stream_pos.setdefault(self.acc.process_index, {})
                mine[batch["worker"]] = mine.get(batch["worker"], 0) + n_items
            for cause, n in batch["skipped"].items():
                st.skipped[cause] = st.skipped.get(cause, 0) + n
                st.bad_example = st.bad_example or batch["skipped_example"]
                if st.skipped[cause] == n:
                    log.warning("skipping bad sample (%s), e.g. %s", cause, batch["skipped_example"])
            bad = sum(st.skipped.values())
            if st.samples_seen >= 64 and bad > self.cfg.max_bad_fraction * st.samples_seen:
                raise SystemExit(self._bad_data_message(
                    f"{bad} of the first {st.samples_seen} samples are unusable (more than "
                    f"--max_bad_fraction {self.cfg.max_bad_fraction})"))
            if batch["caption"]:
                return batch

    def _bad_data_message(self, what: str) -> str:
        st = self.state
        causes = ", ".join(f"{n} {c}" for c, n in sorted(st.skipped.items(), key=lambda x: -x[1])) or "none"
        return (f"{what}. Skipped by cause: {causes}; example: {st.bad_example or '-'}. Check the data path, "
                "the caption files (.txt or --caption_extension) / --caption_column, and --train_batch_size "
                "against the data set size")

    # ---- loop --------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume (if asked), write the resolved config, open trackers and the data stream."""
        cfg, acc, st = self.cfg, self.acc, self.state
        if acc.is_main_process and cfg.overwrite_output_dir:
            gone = clear_previous_run(self.out)
            if gone:
                log.warning("--overwrite_output_dir: deleted the previous run's %s", ", ".join(gone))
        resume = self._resolve_resume()
        if resume:
            check_resume_settings(resume, self.spec.to_dict(), TRAINER_RESUME_KEYS + tuple(self.method_cls.resume_keys))
            self._warn_changed_family_defaults(resume)
            wanted = self._optimizer_settings()
            sh = self.sharding
            load_checkpoint(acc, resume, st, self._json_objects(),
                            read_sharded=(lambda f: sh.load(f, self.opts)) if sh is not None else None,
                            rng_required=not self._elastic())
            relayout(st, self._layout(), self.is_map, resume)
            self._apply_changed_settings(resume, wanted)
            # The run it continues: rotation removes only this run's checkpoints; its training clock goes on.
            info = run_info(resume)
            self.run_id, self.train_seconds = str(info.get("run_id", "")), float(info.get("train_seconds", 0.0))
            log.info("resumed from %s at step %d", resume, st.step)
            if st.good_steps > 0 and st.nan_steps == 0:
                self.last_good_ckpt = resume
        elif cfg.resume_from_checkpoint:
            log.info("no checkpoint in %s yet: starting from step 0", self.out)
        if acc.is_main_process:
            self.spec.dump(self.out / "fewstep_config.yaml")
        if acc.log_with:
            flat = {k: v for k, v in self.spec.to_dict().items() if isinstance(v, (int, float, str, bool))}
            kw = {}
            if cfg.report_to in ("wandb", "all"):
                import wandb

                # The run's files next to TensorBoard's; OUT is rarely a git checkout, so no git lookup.
                kw["wandb"] = {"dir": str(self.out / cfg.logging_dir), "settings": wandb.Settings(disable_git=True)}
            acc.init_trackers(cfg.tracker_project_name, config=flat, init_kwargs=kw)
        self._it = self._epoch_iter(skip=st.batch_in_epoch)

    def _resolve_resume(self) -> Path | None:
        """The main process recovers interrupted saves and picks (and verifies) the checkpoint; every
        rank gets its choice, or its error, so that all resume from the same one or all stop."""
        acc, cfg = self.acc, self.cfg
        choice: list = [None, None]
        if acc.is_main_process:
            for line in recover(self.out):  # a run killed in the middle of a save leaves temporary folders
                log.warning("checkpoint recovery: %s", line)
            try:
                path, notes = resolve_resume(self.out, cfg.resume_from_checkpoint, acc.num_processes,
                                             elastic=self._elastic())
                for line in notes:
                    log.warning("checkpoint check: %s", line)
                choice = [str(path) if path else None, None]
            except CheckpointError as e:
                choice = [None, (isinstance(e, ConfigError), str(e))]
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(choice)  # (our own ranks' strings: pickled between processes, not from disk)
        path, err = choice
        if err:
            bad_input, msg = err
            raise (ResumeMismatch if bad_input else CheckpointError)(msg)
        return Path(path) if path else None

    def _elastic(self) -> bool:
        """Whether a checkpoint of another number of processes can resume exactly: per-batch random
        streams and map-style data (streams keep positions per rank and loader worker)."""
        return self.rng == "batch" and self.is_map

    def _layout(self) -> dict:
        return {"processes": self.acc.num_processes, "train_batch_size": self.cfg.train_batch_size,
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps, "rng_streams": self.rng}

    def _json_objects(self) -> dict:
        """The method's stateful objects fewstep's JSON/safetensors state holds (sharded networks are in
        the sharded state)."""
        return self.sharding.json_objects(self.objects) if self.sharding is not None else self.objects

    def _optimizer_settings(self) -> dict[str, list[dict]]:
        """Every optimizer's group settings as this run built them (from its command line)."""
        return {n: [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.opts[n].param_groups]
                for n in self.names}

    def _apply_changed_settings(self, resume: Path, wanted: dict[str, list[dict]]) -> None:
        """A restored optimizer and scheduler carry the settings of the run that saved them (learning
        rate, betas, ε, weight decay, kernels). This run's command line wins: each value is put back,
        the scheduler rebased on the new learning rate at the restored position, and every change
        logged, so that what runs is what ``fewstep_config.yaml`` records."""
        changed = []
        for name in self.names:
            opt = self.opts[name].optimizer if hasattr(self.opts[name], "optimizer") else self.opts[name]
            sched = getattr(self.scheds[name], "scheduler", self.scheds[name])
            for g, want in zip(opt.param_groups, wanted[name]):
                for k, v in want.items():
                    if g.get(k) != v:
                        changed.append(f"{name} optimizer {_HYPER.get(k, k)}: {g.get(k)!r} -> {v!r}")
                        g[k] = v
            if hasattr(sched, "lr_lambdas") and hasattr(sched, "base_lrs"):
                sched.base_lrs = [w["initial_lr"] for w in wanted[name]]
                lrs = [b * f(sched.last_epoch) for b, f in zip(sched.base_lrs, sched.lr_lambdas)]
                for g, lr in zip(opt.param_groups, lrs):
                    g["lr"] = lr
                sched._last_lr = lrs
        import json

        try:  # settings that need no re-application (schedule shape, clipping, ...): logged, they apply as given
            old = json.loads((resume / "fewstep_state.json").read_text()).get("config") or {}
        except (OSError, ValueError):
            old = {}
        now = self.spec.to_dict()
        for k in sorted(set(old) & set(now)):
            if old[k] != now[k] and k not in ("resume_from_checkpoint", "output_dir", "dry_run"):
                changed.append(f"--{k}: {old[k]!r} -> {now[k]!r}")
        for line in changed:
            log.warning("resumed with a changed setting (applied): %s", line)

    def _warn_changed_family_defaults(self, resume: Path) -> None:
        """A family default that differs from the value the checkpoint's run recorded (a run from before
        the default existed) would change the recipe mid-run without a word: say so."""
        import yaml

        recorded = resume.parent / "fewstep_config.yaml"
        old = (yaml.safe_load(recorded.read_text()) or {}) if recorded.is_file() else {}
        now = self.spec.to_dict()
        for d in self.spec.applied:
            if d.key in old and old[d.key] != now[d.key]:
                log.warning("--%s is %r now (the teacher family's default: %s), but %s recorded %r: give "
                            "--%s %r to keep training as before", d.key, now[d.key], d.source, recorded,
                            old[d.key], d.key, old[d.key])

    def train(self):
        cfg, acc, st = self.cfg, self.acc, self.state
        from tqdm.auto import tqdm

        with self.stop:  # from here a signal means "save at the next step boundary, then exit"
            self.start()
            bar = tqdm(total=cfg.max_train_steps, initial=st.step, disable=not acc.is_main_process or cfg.disable_tqdm,
                       desc="steps")
            t_last = time.time()
            window: dict[str, list[float]] = {}  # logs of the steps since the last --logging_steps boundary
            while st.step < cfg.max_train_steps:
                try:
                    logs = self.step()
                except torch.cuda.OutOfMemoryError as e:
                    raise SystemExit(self._oom_message(e)) from None
                bar.update(1)
                if acc.is_main_process:
                    bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4g}")
                now = time.time()
                logs["step_time"] = now - t_last
                self.train_seconds += now - t_last
                for k, v in logs.items():
                    window.setdefault(k, []).append(float(v))
                if st.step % cfg.logging_steps == 0 or st.step == cfg.max_train_steps:
                    means = {k: sum(v) / len(v) for k, v in window.items()}
                    window = {}
                    acc.log(means, step=st.step)
                    if cfg.disable_tqdm and acc.is_main_process:
                        log.info("step %d/%d: %s", st.step, cfg.max_train_steps,
                                 ", ".join(f"{k} {v:.4g}" for k, v in means.items()))
                if cfg.validation_steps and st.step % cfg.validation_steps == 0:
                    try:
                        self.validate()
                    except torch.cuda.OutOfMemoryError as e:
                        raise SystemExit(self._oom_message(e)) from None
                if st.step % cfg.checkpointing_steps == 0 or st.step == cfg.max_train_steps or self._stop_agreed:
                    self.save()
                t_last = time.time()  # validation and saving are not training time
                if self._stop_agreed:
                    self.stopped_by = self._stop_agreed
                    acc.end_training()
                    where = (f"state saved in {self.out / f'checkpoint-{st.step}'}" if self._saved_step == st.step
                             else f"no checkpoint written during skipped steps; last good one: "
                                  f"{self.last_good_ckpt or 'none'}")
                    msg = (f"stopped by signal {self.stopped_by} at step {st.step}; {where}. Resume with "
                           f"{self.resume_hint} (exit status {128 + self.stopped_by})")
                    if acc.is_main_process:
                        print(msg, file=sys.stderr)
                    return None
        bar.close()
        self._summary()
        acc.wait_for_everyone()
        result, error = None, None
        try:
            result = self.export()  # (every rank: under --fsdp each takes part in gathering the weights)
        except Exception as e:  # noqa: BLE001 - raised below, once every rank knows
            error = e
        if not agree(acc, error is None):  # the other ranks never wait for a main process that failed
            if error is not None:
                raise error
            raise CheckpointError("the export failed on the main process (see its message)")
        acc.end_training()
        return result

    def release(self) -> None:
        """Free the run's networks, then the process group. A DDP wrapper's reducer holds the gloo process
        group; freed last through it, the group's destructor joins its worker thread while holding the
        GIL, and a worker still releasing the last all-reduce's tensors waits for the GIL: both processes'
        work done, one of them never exits (stack captured: ~Reducer → ~ProcessGroupGloo → thread::join,
        the worker in ~AsyncAllreduceWork → gil_scoped_acquire). Freed from Python, its last reference
        drops without the GIL."""
        import gc

        world, self._world = self._world, None
        for name in ("modules", "opts", "scheds", "loader", "method", "sharding"):
            self.__dict__.pop(name, None)
        self.acc._models.clear()
        self.acc._optimizers.clear()
        self.acc._schedulers.clear()
        self.acc._dataloaders.clear()
        gc.collect()
        del world

    def _summary(self) -> None:
        st = self.state
        skipped = sum(st.nonfinite.values())
        why = ", ".join(f"non-finite {k}: {n}" for k, n in st.nonfinite.items() if n) or "none"
        log.info("run summary: %d optimizer steps, %d succeeded, %d skipped (%s); %d samples trained on",
                 st.step, st.good_steps, skipped, why, st.samples_trained)
        if st.skipped:
            log.warning("skipped samples by cause: %s", st.skipped)

    def export(self) -> Path | None:
        """The student as users load it, with its card, in OUT (main process; None elsewhere). After
        :meth:`train`, or after :meth:`start` alone to export a resumed checkpoint as it is; called on
        every rank. Refuses a student that no step trained or that holds a non-finite value; the files
        go to a temporary folder first, so a failure (a full disk) leaves no half-written student."""
        st, acc = self.state, self.acc
        # Under --fsdp every rank takes part in gathering the full weights to the main process's CPU memory
        # (a run that trained nothing is refused below: every rank knows it, and none gathers).
        gather = contextlib.nullcontext()
        if self.sharding is not None and st.good_steps:
            gather = self.sharding.full_weights(acc.is_main_process)
        elif zero.stage(acc) and st.good_steps:  # DeepSpeed's fp32 master weights, gathered (ZeRO-3)
            gather = zero.full_weights([(acc.unwrap_model(self.modules[n]), self.built_dtypes[n])
                                        for n in self.names])
        with gather:
            return self._export_main() if acc.is_main_process else None

    def _export_main(self) -> Path:
        from ..export import ExportError, atomic_export

        st, cfg = self.state, self.cfg
        if st.good_steps == 0:
            raise ExportError(
                f"not exporting: none of the {st.step} optimizer steps succeeded (skipped for non-finite values: "
                f"{st.nonfinite}), so the student would be untrained or hold NaN. Likely causes: NaN/inf in the "
                "teacher or the data, an fp16 VAE (use --mixed_precision bf16), too high --learning_rate. "
                f"Checkpoints in {self.out} are kept")
        facts = atomic_export(self.out, self.method.export)
        b = self.bundle
        write_model_card(self.out, cfg.pretrained_teacher_model, cfg.method, facts,
                         load_args=b.card_load_args() if b is not None else "",
                         call_kwargs={**b.call_kwargs(), **b.guidance_call_kwargs(facts.get("guidance_scale"))}
                         if b is not None else None, guidance_arg=b is None or b.pipeline_guidance_scale)
        log.info("student written to %s", self.out)
        return self.out

    def _oom_message(self, e: Exception) -> str:
        cfg = self.cfg
        on = {"--gradient_checkpointing": cfg.gradient_checkpointing, "--use_8bit_adam": cfg.use_8bit_adam,
              "--cast_teacher_unet": cfg.cast_teacher_unet}
        tag = {k: " (already on)" if v else "" for k, v in on.items()}
        last = self.last_good_ckpt
        hints = "".join(f"  {h}\n" for h in self.method_cls.memory_hints(cfg, self.spec.method))
        return (f"out of GPU memory at step {self.state.step}: {str(e).splitlines()[0] if str(e) else 'CUDA OOM'}.\n"
                "Options, cheapest first:\n"
                f"  --gradient_checkpointing{tag['--gradient_checkpointing']}  (recompute activations in backward)\n"
                f"  --use_8bit_adam{tag['--use_8bit_adam']}  (bitsandbytes AdamW8bit: optimizer state /4)\n"
                f"  a smaller --train_batch_size (now {cfg.train_batch_size}) with a larger "
                "--gradient_accumulation_steps for the same global batch\n"
                f"  --cast_teacher_unet{tag['--cast_teacher_unet']} with --mixed_precision fp16 or bf16 "
                f"(now {cfg.mixed_precision}): the frozen teacher in half precision\n"
                f"{hints}"
                f"Last complete checkpoint: {last or 'none'} "
                "(resume with --resume_from_checkpoint latest)")

    def save(self) -> Path | None:
        """A checkpoint of everything; streamed-data positions of every rank are gathered first, since
        the training state is written by the main process only. None while the run is in a streak of
        skipped steps: the checkpoints must stay ones written after a successful step."""
        st = self.state
        if self._saved_step == st.step:
            return self.out / f"checkpoint-{st.step}"
        if st.nan_steps > 0 or st.good_steps == 0:
            log.warning("not writing checkpoint-%d: %s", st.step,
                        f"the last {st.nan_steps} step(s) were skipped" if st.nan_steps else "no step succeeded yet")
            return None
        if not self.is_map and self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            mine = st.stream_pos.get(self.acc.process_index, {})
            st.stream_pos = dict(gather_object([(self.acc.process_index, mine)]))
        config = self.spec.to_dict()
        st.layout = self._layout()
        sh = self.sharding
        path = save_checkpoint(
            self.acc, self.out, st.step, self.cfg.checkpoints_total_limit,
            write_extra=lambda folder: write_state(folder, st.state_dict(), self._json_objects(), config),
            info={"good_steps": st.good_steps, "last_good_step": st.last_good_step},
            need_bytes=lambda: checkpoint_bytes(self.out, self.acc, self.objects),
            run={"run_id": self.run_id, "train_seconds": round(self.train_seconds, 3)},
            write_sharded=(lambda folder: sh.save(folder, self.opts)) if sh is not None else None)
        self._saved_step = st.step
        self.last_good_ckpt = path
        if self.acc.is_main_process:
            log.info("checkpoint saved: %s", path)
            for callback in self.on_save:
                callback(st.step, self.train_seconds, path)
        return path

    def step(self) -> dict[str, float]:
        """One optimizer step of the phase's group (gradient_accumulation_steps micro-batches).

        The host waits on the GPU once per step, after backward and clipping: the skip decision for
        a non-finite loss or gradient, the gradient norm and the logs come back in one transfer. The
        forward and backward are queued without interruption, and the optimizer, EMA and the next
        batch's loading overlap with what the GPU still has to do.
        """
        cfg, acc, st = self.cfg, self.acc, self.state
        phase = self.method.phase(st.step)
        module, opt = self.modules[phase], self.opts[phase]
        if len(self.params) > 1:  # only the phase's group builds a graph
            for name, params in self.params.items():
                for p in params:
                    p.requires_grad_(name == phase)
        dev = acc.device
        loss_bad = torch.zeros((), device=dev)
        logs_t: dict[str, torch.Tensor] = {}
        bad, cause, gn = False, None, None
        n_samples = 0
        for _ in range(cfg.gradient_accumulation_steps):
            batch = self._next_batch()
            n_samples += len(batch["caption"])
            if self.rng == "batch":  # this micro-batch's draws, whichever process runs it (training/seeding.py)
                reseed(cfg.seed, st.epoch, global_position(st.batch_in_epoch - 1, acc.process_index,
                                                           acc.num_processes))
            with acc.accumulate(module):
                # Every network the method runs (frozen teacher and target included) under the mixed-
                # precision autocast, as the trainable ones already are through accelerate's wrapper.
                with acc.autocast(), zero.autocast(acc):
                    out = self.method.loss(phase, batch, st.step)
                loss_bad = loss_bad + (~torch.isfinite(out.loss.detach().float())).any().float()
                for k, v in out.logs.items():
                    v = torch.as_tensor(v, dtype=torch.float32).detach().to(dev)
                    logs_t[k] = logs_t.get(k, 0.0) + v / cfg.gradient_accumulation_steps
                # A non-finite loss still runs backward: every rank must take part in DDP's gradient
                # all-reduce; the step is then skipped on all ranks together.
                acc.backward(out.loss)
                if acc.sync_gradients:
                    # The total gradient norm (clipping with an infinite bound changes nothing: the
                    # factor is clamped to exactly 1). DeepSpeed clips inside its engine and returns None.
                    gn = acc.clip_grad_norm_(module.parameters(),
                                             cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
                    gn = None if gn is None else plain(gn)  # (sharded gradients give a replicated DTensor)
                    bad, cause, gn = self._skip_decision(loss_bad, gn, logs_t, n_samples)
                    if not bad:
                        opt.step()
                    elif acc.scaler is not None:
                        # clip_grad_norm_ unscaled the gradients; close the scaler's step so the next
                        # unscale is allowed (found-inf makes it back off its scale, as a skip would).
                        acc.scaler.update()
                if self.sharding is None or acc.sync_gradients:
                    # (accelerate's optimizer wrapper zeroes only at a sync step; a sharded run's raw
                    # optimizer must keep the accumulated gradients the same way)
                    opt.zero_grad(set_to_none=True)
        logs: dict[str, float] = {k: v for k, v in self._host_logs.items()}
        logs[f"lr/{phase}"] = opt.param_groups[0]["lr"]  # the learning rate this step used
        self._tick_schedules(phase, st.step)
        if gn is not None and not bad:
            logs["grad_norm"] = gn
        logs["batch_size"] = st.last_batch  # the effective batch: samples of all ranks and micro-batches
        if bad:
            st.nan_steps += 1
            st.nonfinite[cause] = st.nonfinite.get(cause, 0) + 1
            log.warning("non-finite %s at step %d: step skipped (%d in a row)", cause, st.step, st.nan_steps)
            if st.nan_steps >= cfg.max_nan_steps:
                last = (f"{self.last_good_ckpt} (written after step {st.last_good_step}, the last step that succeeded)"
                        if self.last_good_ckpt else
                        "none (no checkpoint was written after a successful step" +
                        ("; no step of this run succeeded)" if st.good_steps == 0 else ")"))
                raise SystemExit(
                    f"{st.nan_steps} consecutive steps with a non-finite loss or gradient: stopping. Likely causes: an fp16 VAE "
                    "(use --mixed_precision bf16 or an fp16-safe --pretrained_vae_model_name_or_path), too high "
                    f"--learning_rate, or bad data. Last good checkpoint: {last}")
        else:
            st.nan_steps = 0
            st.good_steps += 1
            st.last_good_step = st.step + 1
            st.samples_trained += st.last_batch
        st.step += 1
        if not bad:
            self.method.after_step(phase, st.step)
        return {k: v for k, v in logs.items() if not (isinstance(v, float) and math.isnan(v))}

    def _tick_schedules(self, phase: str, step: int) -> None:
        """Advance each group's learning-rate schedule by the ticks the method declares for this step.

        Every step ticks, a skipped one too: a schedule is then a function of the step counter alone, as
        in the reference loops, which never skip. The trainer steps the schedulers itself rather than
        through accelerate's wrapper, which would step once per process and only after its own group's
        optimizer step (a generator schedule must also move on the fake score's steps). Under DeepSpeed the
        engine steps its (single) group's scheduler with each optimizer step itself."""
        import warnings

        from accelerate.utils.deepspeed import DeepSpeedSchedulerWrapper

        for name, n in self.method.schedule_ticks(phase, step).items():
            if isinstance(self.scheds[name], DeepSpeedSchedulerWrapper):
                continue
            inner = getattr(self.scheds[name], "scheduler", self.scheds[name])
            with warnings.catch_warnings():
                # torch warns when a schedule moves before its optimizer's first step in this process (a
                # skipped first step, a group not yet updated since a resume): intended here, see above.
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                for _ in range(n):
                    inner.step()

    def _skip_decision(self, loss_bad: torch.Tensor, gn, logs_t: dict[str, torch.Tensor], n_samples: int = 0):
        """(skip?, cause, grad norm) from ONE device-to-host transfer, agreed by all ranks.

        A non-finite loss on any rank skips the step. A non-finite gradient norm skips it too, except
        under an fp16 GradScaler, whose own step skip and scale backoff handle overflow. The same
        all-reduce carries a stop request (a signal received by any rank) and the step's sample count:
        every rank decides to stop after the same step, so none waits in a collective for the others."""
        acc = self.acc
        gn_t = torch.full((), float("nan"), device=acc.device) if gn is None else torch.as_tensor(gn).float().to(acc.device)
        grad_bad = (~torch.isfinite(gn_t)).float() if (gn is not None and acc.scaler is None) else torch.zeros_like(gn_t)
        term, other = self.stop.code()  # read once: a signal arriving later is carried by the next step
        extra = torch.tensor([term, other, float(n_samples)], device=acc.device)
        flags = torch.cat([torch.stack([loss_bad.reshape(()), grad_bad.reshape(())]), extra])
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        keys = list(logs_t)
        host = torch.cat([flags, gn_t.reshape(1), *[logs_t[k].reshape(1) for k in keys]]).tolist()
        self._host_logs = dict(zip(keys, host[6:]))
        loss_bad_n, grad_bad_n, term_n, other_n, samples_n, gn_v = host[:6]
        self.state.last_batch = int(samples_n)
        if term_n > 0 or other_n > 0:
            self._stop_agreed = signal.SIGTERM if term_n > 0 else (self.stop.signum or signal.SIGINT)
        if loss_bad_n > 0:
            return True, "loss", None
        if grad_bad_n > 0:
            return True, "grad", None
        return False, None, (None if gn is None else gn_v)

    @torch.no_grad()
    def validate(self):
        """Student samples at each validation step count on fixed prompts and seeds → PNG + tracker. Under
        --fsdp and ZeRO-3 every rank samples (each forward gathers the shards: a collective), the main one
        writes."""
        every_rank = self.sharding is not None or zero.stage(self.acc) == 3  # (forwards gather: collectives)
        if not self.acc.is_main_process and not every_rank:
            self.acc.wait_for_everyone()
            return
        cfg = self.cfg
        prompts = cfg.validation_prompts
        seeds = list(range(len(prompts)))
        steps = validation_rows(cfg.validation_inference_steps, self.method.trained_steps())
        if steps != list(cfg.validation_inference_steps) and not getattr(self, "_told_rows", False):
            self._told_rows = True
            log.info("validation rows at %s steps: the student is trained for %s steps (--validation_inference_steps "
                     "%s clamped into that range)", steps, "–".join(map(str, sorted(set(self.method.trained_steps())))),
                     cfg.validation_inference_steps)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), zero.autocast(self.acc):  # (never shifts the training RNG)
            rows = [self.method.sample(prompts, seeds, n, cfg.validation_guidance_scale) for n in steps]
        if not self.acc.is_main_process:
            self.acc.wait_for_everyone()
            return
        grid = image_grid(rows)
        from PIL import Image

        vdir = self.out / "validation"
        vdir.mkdir(exist_ok=True)
        path = vdir / f"step-{self.state.step:07d}.png"
        Image.fromarray(grid).save(path)
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", grid, self.state.step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": wandb.Image(grid)}, step=self.state.step)
        log.info("validation grid (rows: %s steps) written to %s", steps, path)
        self.acc.wait_for_everyone()
