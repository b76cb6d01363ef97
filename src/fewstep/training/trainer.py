"""The method-agnostic training loop on accelerate.

It knows trainable groups, optimizers, phases, accumulation, clipping, mixed precision, logging,
validation, checkpoints, signals and non-finite losses — and nothing about any method's math.
"""

from __future__ import annotations

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
from ..models.bundle import weight_dtype_of  # noqa: F401  (re-exported)
from .checkpoint import (
    ResumeMismatch,
    check_resume_settings,
    fault_point,
    list_checkpoints,
    recover,
    resolve_resume,
    save_checkpoint,
)
from .speed import check_compile, speed_setup

log = logging.getLogger("fewstep")


class TrainState:
    """Counters the checkpoint must restore: optimizer steps done and the data position."""

    def __init__(self):
        self.step, self.epoch, self.batch_in_epoch, self.nan_steps, self.skipped = 0, 0, 0, 0, {}
        self.samples_seen, self.bad_example = 0, None
        self.nonfinite = {"loss": 0, "grad": 0}  # skipped steps by cause, over the whole run
        # Streamed data: items of the current epoch consumed per rank and loader worker, so a resumed
        # run continues each worker's stream exactly (see data/stream.py).
        self.stream_pos: dict[int, dict[int, int]] = {}

    def state_dict(self):
        fault_point("save_state", self.step)  # tests: a kill after accelerate wrote models and optimizers
        return dict(vars(self))

    def load_state_dict(self, d):
        vars(self).update(d)


class StopRequested:
    """SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits cleanly."""

    def __init__(self):
        self.signum = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %s received: finishing this step, saving a checkpoint, then exiting", signum)

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
            raise SystemExit("--use_8bit_adam needs bitsandbytes: pip install 'fewstep[8bit]' (CUDA only)") from None
        cls = bnb.optim.AdamW8bit
        kw = {}
    else:
        cls = torch.optim.AdamW
        # One fused kernel per parameter group on CUDA; the same update math as the foreach kernels.
        fused = cfg.adam_impl == "fused" or (cfg.adam_impl == "auto" and torch.cuda.is_available())
        kw = {"fused": True} if fused else {"foreach": True}
    return cls(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
               eps=cfg.adam_epsilon, **kw)


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
    if log_with == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise SystemExit("--report_to wandb needs wandb: pip install 'fewstep[wandb]'") from None
    acc = Accelerator(
        # On a machine without CUDA, cpu=True lets several processes started by torchrun form a gloo
        # process group (MULTI_CPU); without it each would run alone and all would write OUT.
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / cfg.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=False),
    )
    from accelerate.utils import DistributedType

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and acc.distributed_type != DistributedType.FSDP:
        # accelerate turns FSDP on only for GPU-like devices; on CPU processes it silently runs DDP.
        log.warning("an FSDP accelerate config was given, but accelerate runs FSDP only on GPUs: this run uses %s "
                    "(whole model on every rank)", acc.distributed_type.value)
    return acc


class Trainer:
    """Runs ``spec.method_cls`` (the method class config resolution bound the run to) over the data."""

    def __init__(self, spec: RunSpec, bundle=None):
        from accelerate.utils import set_seed

        self.spec, cfg = spec, spec.train
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.acc = acc = build_accelerator(cfg, self.out)
        logging.basicConfig(level=logging.INFO if acc.is_main_process else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        set_seed(cfg.seed, device_specific=True)  # a different noise stream per rank
        if torch.cuda.is_available():
            # Training shapes are fixed (one resolution, one batch size): autotuning pays once.
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        if cfg.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        method_cls = spec.method_cls
        check_compile(cfg, acc.device.type)  # before any weight loads
        if bundle is None:
            method_cls.preflight(cfg, spec.method)  # settings × the teacher's configs, before its weights load
        self.bundle = bundle or method_cls.make_bundle(cfg, spec.method)
        if cfg.enable_xformers_memory_efficient_attention:
            try:
                import xformers  # noqa: F401
            except ImportError:
                raise SystemExit("--enable_xformers_memory_efficient_attention needs xformers "
                                 "(pip install xformers); without it PyTorch SDPA is used") from None
            self.bundle.denoiser.enable_xformers_memory_efficient_attention()

        # The method moves and casts what it holds frozen; trainables stay fp32 (autocast does the rest).
        self.method = method_cls(cfg, spec.method, self.bundle, acc)
        speed_setup(cfg, self.method, self.bundle, acc.device)
        groups = self.method.groups()
        if cfg.enable_xformers_memory_efficient_attention:
            for g in groups.values():
                if hasattr(g.module, "enable_xformers_memory_efficient_attention"):
                    g.module.enable_xformers_memory_efficient_attention()
        from diffusers.optimization import get_scheduler

        self.names = list(groups)
        self.opts, self.scheds, self.params = {}, {}, {}
        for name, g in groups.items():
            params = g.params or [p for p in g.module.parameters() if p.requires_grad]
            self.params[name] = params
            self.opts[name] = make_optimizer(cfg, params, g.lr or cfg.learning_rate)
            # accelerate steps a prepared scheduler once per process, hence the num_processes factor.
            self.scheds[name] = get_scheduler(cfg.lr_scheduler, self.opts[name],
                                              num_warmup_steps=cfg.lr_warmup_steps * acc.num_processes,
                                              num_training_steps=cfg.max_train_steps * acc.num_processes)

        self.dataset = build_dataset(cfg)
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

        prepared = acc.prepare(*[groups[n].module for n in self.names],
                               *[self.opts[n] for n in self.names], *[self.scheds[n] for n in self.names])
        k = len(self.names)
        self.method.bind(dict(zip(self.names, prepared[:k])))
        self.opts = dict(zip(self.names, prepared[k:2 * k]))
        self.scheds = dict(zip(self.names, prepared[2 * k:]))
        self.modules = dict(zip(self.names, prepared[:k]))
        # Iterable (streamed) data is split per rank by the data set itself, not by accelerate.
        self.loader = acc.prepare_data_loader(loader) if is_map else loader
        self.is_map = is_map

        self.state = TrainState()
        self._host_logs: dict[str, float] = {}
        acc.register_for_checkpointing(self.state)
        for obj in self.method.stateful().values():
            acc.register_for_checkpointing(obj)

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
            n_items = len(batch["caption"]) + sum(batch["skipped"].values())
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
                "the caption files / --caption_column, and --train_batch_size against the data set size")

    # ---- loop --------------------------------------------------------------------------------
    def start(self) -> None:
        """Resume (if asked), write the resolved config, open trackers and the data stream."""
        cfg, acc, st = self.cfg, self.acc, self.state
        if acc.is_main_process:  # a run killed in the middle of a save leaves temporary folders
            for line in recover(self.out):
                log.warning("checkpoint recovery: %s", line)
        acc.wait_for_everyone()
        resume = resolve_resume(self.out, cfg.resume_from_checkpoint)
        if resume:
            check_resume_settings(resume, self.spec.to_dict())
            try:
                acc.load_state(str(resume))
            except (RuntimeError, KeyError, ValueError) as e:  # shapes or keys of another configuration
                first = " ".join(str(e).split())[:300] or type(e).__name__  # "hundreds of missing keys" cut short
                raise ResumeMismatch(
                    f"--resume_from_checkpoint {resume}: this run's models or optimizers cannot load it ({first}). "
                    "Was it written with other settings? Resume with the run's settings (see "
                    f"{resume.parent / 'fewstep_config.yaml'}), or start a new run with another --output_dir") from e
            log.info("resumed from %s at step %d", resume, st.step)
        elif cfg.resume_from_checkpoint:
            log.info("no checkpoint in %s yet: starting from step 0", self.out)
        if acc.is_main_process:
            self.spec.dump(self.out / "fewstep_config.yaml")
        if acc.log_with:
            flat = {k: v for k, v in self.spec.to_dict().items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("fewstep", config=flat)
        self._it = self._epoch_iter(skip=st.batch_in_epoch)

    def train(self):
        cfg, acc, st = self.cfg, self.acc, self.state
        self.start()
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_train_steps, initial=st.step, disable=not acc.is_main_process, desc="steps")
        t_last = time.time()
        with StopRequested() as stop:
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
                t_last = now
                acc.log(logs, step=st.step)
                if cfg.validation_steps and st.step % cfg.validation_steps == 0:
                    try:
                        self.validate()
                    except torch.cuda.OutOfMemoryError as e:
                        raise SystemExit(self._oom_message(e)) from None
                if st.step % cfg.checkpointing_steps == 0 or st.step == cfg.max_train_steps:
                    self.save()
                if stop.signum is not None:
                    path = self.save()
                    acc.end_training()
                    msg = (f"stopped by signal {stop.signum} at step {st.step}; state saved in {path}. Resume with "
                           f"the same command plus --resume_from_checkpoint latest")
                    if acc.is_main_process:
                        print(msg, file=sys.stderr)
                    return None
        bar.close()
        if any(st.nonfinite.values()):
            log.warning("steps skipped for non-finite values: %s", st.nonfinite)
        if st.skipped:
            log.warning("skipped samples by cause: %s", st.skipped)
        acc.wait_for_everyone()
        result = None
        if acc.is_main_process:
            facts = self.method.export(self.out)
            b = self.bundle
            write_model_card(self.out, cfg.pretrained_teacher_model, cfg.method, facts,
                             load_args=b.card_load_args() if b is not None else "",
                             call_kwargs={**b.call_kwargs(), **b.guidance_call_kwargs(facts.get("guidance_scale"))}
                             if b is not None else None)
            result = self.out
            log.info("student written to %s", self.out)
        acc.end_training()
        return result

    def _oom_message(self, e: Exception) -> str:
        cfg = self.cfg
        on = {"--gradient_checkpointing": cfg.gradient_checkpointing, "--use_8bit_adam": cfg.use_8bit_adam,
              "--cast_teacher_unet": cfg.cast_teacher_unet,
              "--lora_rank": bool(getattr(self.spec.method, "lora_rank", 0))}
        tag = {k: " (already on)" if v else "" for k, v in on.items()}
        last = list_checkpoints(self.out)
        return (f"out of GPU memory at step {self.state.step}: {str(e).splitlines()[0] if str(e) else 'CUDA OOM'}.\n"
                "Options, cheapest first:\n"
                f"  --gradient_checkpointing{tag['--gradient_checkpointing']}  (recompute activations in backward)\n"
                f"  --use_8bit_adam{tag['--use_8bit_adam']}  (bitsandbytes AdamW8bit: optimizer state /4)\n"
                f"  a smaller --train_batch_size (now {cfg.train_batch_size}) with a larger "
                "--gradient_accumulation_steps for the same global batch\n"
                f"  --cast_teacher_unet{tag['--cast_teacher_unet']} with --mixed_precision fp16 or bf16 "
                f"(now {cfg.mixed_precision}): the frozen teacher in half precision\n"
                f"  LoRA: --lora_rank 64{tag['--lora_rank']} (train adapters only; one UNet in memory)\n"
                f"Last complete checkpoint: {last[-1][1] if last else 'none'} "
                "(resume with --resume_from_checkpoint latest)")

    def save(self) -> Path:
        """A checkpoint of everything; streamed-data positions of every rank are gathered first, since
        the training state is written by the main process only."""
        if not self.is_map and self.acc.num_processes > 1:
            from accelerate.utils import gather_object

            mine = self.state.stream_pos.get(self.acc.process_index, {})
            self.state.stream_pos = dict(gather_object([(self.acc.process_index, mine)]))
        return save_checkpoint(self.acc, self.out, self.state.step, self.cfg.checkpoints_total_limit)

    def step(self) -> dict[str, float]:
        """One optimizer step of the phase's group (gradient_accumulation_steps micro-batches).

        The host waits on the GPU once per step, after backward and clipping: the skip decision for
        a non-finite loss or gradient, the gradient norm and the logs come back in one transfer. The
        forward and backward are queued without interruption, and the optimizer, EMA and the next
        batch's loading overlap with what the GPU still has to do.
        """
        cfg, acc, st = self.cfg, self.acc, self.state
        phase = self.method.phase(st.step)
        module, opt, sched = self.modules[phase], self.opts[phase], self.scheds[phase]
        if len(self.params) > 1:  # only the phase's group builds a graph
            for name, params in self.params.items():
                for p in params:
                    p.requires_grad_(name == phase)
        dev = acc.device
        loss_bad = torch.zeros((), device=dev)
        logs_t: dict[str, torch.Tensor] = {}
        bad, cause, gn = False, None, None
        for _ in range(cfg.gradient_accumulation_steps):
            batch = self._next_batch()
            with acc.accumulate(module):
                # Every network the method runs (frozen teacher and target included) under the mixed-
                # precision autocast, as the trainable ones already are through accelerate's wrapper.
                with acc.autocast():
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
                    bad, cause, gn = self._skip_decision(loss_bad, gn, logs_t)
                    if not bad:
                        opt.step()
                        sched.step()
                    elif acc.scaler is not None:
                        # clip_grad_norm_ unscaled the gradients; close the scaler's step so the next
                        # unscale is allowed (found-inf makes it back off its scale, as a skip would).
                        acc.scaler.update()
                opt.zero_grad(set_to_none=True)
        logs: dict[str, float] = {k: v for k, v in self._host_logs.items()}
        if gn is not None and not bad:
            logs["grad_norm"] = gn
        if bad:
            st.nan_steps += 1
            st.nonfinite[cause] = st.nonfinite.get(cause, 0) + 1
            log.warning("non-finite %s at step %d: step skipped (%d in a row)", cause, st.step, st.nan_steps)
            if st.nan_steps >= cfg.max_nan_steps:
                last = list_checkpoints(self.out)
                raise SystemExit(
                    f"{st.nan_steps} consecutive steps with a non-finite loss or gradient: stopping. Likely causes: an fp16 VAE "
                    "(use --mixed_precision bf16 or an fp16-safe --pretrained_vae_model_name_or_path), too high "
                    "--learning_rate, or bad data. Last good checkpoint: "
                    f"{last[-1][1] if last else 'none'}")
        else:
            st.nan_steps = 0
        st.step += 1
        if not bad:
            self.method.after_step(phase, st.step)
        logs[f"lr/{phase}"] = sched.get_last_lr()[0]
        return {k: v for k, v in logs.items() if not (isinstance(v, float) and math.isnan(v))}

    def _skip_decision(self, loss_bad: torch.Tensor, gn, logs_t: dict[str, torch.Tensor]):
        """(skip?, cause, grad norm) from ONE device-to-host transfer, agreed by all ranks.

        A non-finite loss on any rank skips the step. A non-finite gradient norm skips it too, except
        under an fp16 GradScaler, whose own step skip and scale backoff handle overflow."""
        acc = self.acc
        gn_t = torch.full((), float("nan"), device=acc.device) if gn is None else torch.as_tensor(gn).float().to(acc.device)
        grad_bad = (~torch.isfinite(gn_t)).float() if (gn is not None and acc.scaler is None) else torch.zeros_like(gn_t)
        flags = torch.stack([loss_bad.reshape(()), grad_bad.reshape(())])
        if acc.num_processes > 1:
            flags = acc.reduce(flags, reduction="sum")
        keys = list(logs_t)
        host = torch.cat([flags, gn_t.reshape(1), *[logs_t[k].reshape(1) for k in keys]]).tolist()
        self._host_logs = dict(zip(keys, host[3:]))
        loss_bad_n, grad_bad_n, gn_v = host[:3]
        if loss_bad_n > 0:
            return True, "loss", None
        if grad_bad_n > 0:
            return True, "grad", None
        return False, None, (None if gn is None else gn_v)

    @torch.no_grad()
    def validate(self):
        """Student samples at each validation step count on fixed prompts and seeds → PNG + tracker."""
        if not self.acc.is_main_process:
            self.acc.wait_for_everyone()
            return
        cfg = self.cfg
        prompts = cfg.validation_prompts
        seeds = list(range(len(prompts)))
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):  # validation never shifts the training RNG
            rows = [self.method.sample(prompts, seeds, n, cfg.validation_guidance_scale)
                    for n in cfg.validation_inference_steps]
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
        log.info("validation grid (rows: %s steps) written to %s", cfg.validation_inference_steps, path)
        self.acc.wait_for_everyone()
