"""Every option does something (issue 15, item 10): for every key × method × a set of base settings ×
teacher family, setting the key to another valid value either changes the settings the run uses
(``config.used_settings``: the trainer's keys and the method's ``Config.uses``) or is refused with a
ConfigError, at parse time or by the checks that run once the teacher's family is known. A new key
that neither changes a used setting nor is refused makes this test fail: no option can be parsed and
then silently ignored.

No model is built: the teachers are read as configs (``load_bundle(weights=False)``, as --dry_run
does), so the whole matrix takes seconds. ``test_declared_keys_are_read_by_a_real_run`` ties the
declarations to the code: a key a method declares it uses must be read during a real tiny run.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fewstep.config import ConfigError, RunSpec, TrainConfig, check_teacher_settings, resolve, used_settings
from fewstep.methods import REGISTRY

# A valid value other than the current one, per key (a list: the first that differs is used). Every key
# of every config must be here, so a new option must be thought about.
ALT = {
    # common
    "output_dir": ["other-out"], "seed": [1], "dry_run": [True], "teacher_revision": ["main"],
    "cast_teacher_unet": [True], "train_data_dir": ["{other_data}"], "train_shards_path_or_url": ["s/{0..1}.tar"],
    "dataset_name": ["mnist", "fashion"], "file_list": ["list.txt", "list2.txt"], "data_resampling": [True],
    "cache_dir": ["{cache}", "{cache2}"], "image_column": ["img"], "caption_column": ["caption"], "max_train_samples": [4],
    "resolution": [64], "center_crop": [True, False], "random_flip": [True], "use_fix_crop_and_size": [True],
    "interpolation_type": ["bicubic"], "proportion_empty_prompts": [0.1], "dataloader_num_workers": [1],
    "max_bad_fraction": [0.9], "train_batch_size": [4], "gradient_accumulation_steps": [2],
    "max_train_steps": [3001, 3002], "learning_rate": [2e-6, 3e-6], "lr_scheduler": ["cosine", "linear"],
    "lr_warmup_steps": [10, 11], "use_8bit_adam": [True], "adam_beta1": [0.8], "adam_beta2": [0.99],
    "adam_weight_decay": [0.01, 0.02], "adam_epsilon": [1e-6], "max_grad_norm": [2.0], "mixed_precision": ["bf16", "fp16"],
    "allow_tf32": [True], "gradient_checkpointing": [True], "enable_xformers_memory_efficient_attention": [True],
    "vae_encode_batch_size": [8], "cudnn_benchmark": [False], "channels_last": [True], "torch_compile": [True],
    "torch_compile_mode": ["max-autotune"], "torch_compile_backend": ["aot_eager"], "adam_impl": ["foreach"],
    "report_to": ["none", "tensorboard"], "logging_dir": ["lg"], "checkpointing_steps": [10],
    "checkpoints_total_limit": [2], "resume_from_checkpoint": ["latest"], "validation_steps": [10, 20],
    "validation_prompts": [["x"]], "validation_inference_steps": [[1]], "validation_guidance_scale": [3.0],
    "max_nan_steps": [5],
    "fsdp": [True], "fsdp_frozen": ["shard", "replicate"], "fsdp_offload": [True], "fsdp_reshard_after_forward": [False],
    "fsdp_wrap": [["BasicTransformerBlock"]], "rng_streams": ["batch", "rank"],
    "pretrained_teacher_model": ["{other_teacher}"],
    # other tools' habits (PaddleMIX, DiffSynth-Studio, kohya, the hub)
    "preset": ["lcm/sd15", "lcm/sd15-lora"], "overwrite_output_dir": [True], "do_train": [True],
    "is_sdxl": [False, True], "model_max_length": [16], "caption_extension": [".caption"],
    "dataset_base_path": ["{other_data}"], "extra_inputs": [["cfg_scale"]], "dataset_repeat": [2],
    "num_train_epochs": [2, 3], "tracker_project_name": ["other"], "logging_steps": [5], "disable_tqdm": [True],
    "find_unused_parameters": [True], "push_to_hub": [True], "hub_model_id": ["me/student"],
    "hub_token": ["hf_x"],
    "pretrained_vae_model_name_or_path": ["{other_teacher}"],
    # lcm
    "w_min": [3.0], "w_max": [10.0], "num_ddim_timesteps": [25], "loss_type": ["huber", "l2"], "huber_c": [0.01],
    "timestep_scaling_factor": [5.0], "unet_time_cond_proj_dim": [128], "ema_decay": [0.9], "is_lora": [True],
    "lora_rank": [8, 16], "lora_alpha": [8.0], "lora_dropout": [0.1], "lora_target_modules": [["to_q"]],
    # direct
    "direct_variant": ["trajectory"], "student_steps": [2], "student_guidance_scale": [2.0], "checkpoint_steps": [False],
    # dmd2
    "real_guidance_scale": [3.0], "fake_guidance_scale": [1.5], "dfake_gen_update_ratio": [5], "generator_lr": [1e-5, 2e-5],
    "guidance_lr": [1e-5, 2e-5], "min_step_percent": [0.1], "max_step_percent": [0.9], "conditioning_timestep": [399],
    "num_denoising_step": [2, 1], "backward_simulation": [True], "dm_loss_weight": [0.5, 0.0],
    "fake_score_lora_rank": [8, 16], "fake_score_lora_alpha": [8.0], "fake_score_lora_target_modules": [["to_q"]],
    "gen_cls_loss_weight": [1e-3, 0.0], "guidance_cls_loss_weight": [1e-3, 0.0], "cls_on_clean_image": [True],
    "diffusion_gan": [False], "diffusion_gan_max_timestep": [500], "regression_loss_weight": [0.5, 2.0],
    "gan_head": ["pooled"], "regression_loss": ["lpips", "mse"], "lpips_weights": ["{lpips}", "{lpips2}"], "regression_only": [True],
    "generator_ckpt_path": ["{other_teacher}"],
    # disback
    "disback_stage": ["degradation", "both"], "degradation_steps": [100], "degradation_interval": [20],
    "interval": [50], "degradation_path": ["p2", "p3"],
    # teacher
    "teacher_preset": ["tiny"], "prediction_type": ["v_prediction"], "vae_train_steps": [100, 200],
    "vae_learning_rate": [1e-4], "vae_kl_weight": [1e-5], "teacher_ema_decay": [0.99], "caption_dropout": [0.2],
    "teacher_guidance_scale": [3.0], "teacher_inference_steps": [25], "teacher_vae": ["{other_teacher}"],
}

# Compatibility flags whose one valid value is the default: any other is refused (PaddleMIX's --do_train:
# `fewstep distill` always trains; tests/test_reference_commands.py checks the refusal).
ONLY_DEFAULT = {"do_train"}

# Base settings per method (on top of COMMON): the combinations in which keys turn on or off.
TRAIN_BASES = [{}, {"validation_steps": 0}, {"report_to": "none"}, {"lr_scheduler": "cosine"},
               {"torch_compile": True}, {"use_8bit_adam": True}, {"mixed_precision": "bf16"},
               {"train_data_dir": None, "train_shards_path_or_url": "s/{0..3}.tar"},
               {"train_data_dir": None, "file_list": "list.txt"}, {"train_data_dir": None, "dataset_name": "mnist"},
               {"train_data_dir": None, "cache_dir": "{cache}"}, {"pretrained_teacher_model": "org/teacher"},
               {"push_to_hub": True}, {"fsdp": True}, {"report_to": "none", "disable_tqdm": True}]
BASES = {
    "lcm": TRAIN_BASES + [{"lora_rank": 4}, {"lora_rank": 4, "mixed_precision": "bf16"}, {"loss_type": "huber"}],
    "direct": [{}, {"lora_rank": 4}, {"validation_steps": 0}],
    "dmd2": [{}, {"mixed_precision": "bf16"}, {"fake_score_lora_rank": 4, "mixed_precision": "bf16"},
             {"cls_on_clean_image": True},
             {"gen_cls_loss_weight": 5e-3, "guidance_cls_loss_weight": 1e-2, "diffusion_gan": False},
             {"num_denoising_step": 4}, {"dm_loss_weight": 0.0, "regression_loss_weight": 1.0},
             {"regression_loss_weight": 1.0, "regression_loss": "lpips", "lpips_weights": "{lpips}"},
             {"generator_lr": 1e-5, "guidance_lr": 1e-5}, {"validation_steps": 0}],
    "disback": [{}, {"disback_stage": "degradation"}, {"disback_stage": "degradation", "guidance_lr": 1e-5},
                {"disback_stage": "degradation", "mixed_precision": "bf16", "fake_score_lora_rank": 4},
                {"disback_stage": "backtracking", "degradation_path": "p"}],
    "teacher": [{}, {"vae_train_steps": 0}, {"validation_steps": 0}],
}


@pytest.fixture(autouse=True)
def optional_packages(monkeypatch):
    """The optional packages (bitsandbytes, xformers, wandb) count as installed here: the question is
    whether their options are used, not whether this machine has them (their absence has its own test)."""
    import fewstep.config

    monkeypatch.setattr(fewstep.config, "installed", lambda module: True)
    # (likewise a GPU: --fsdp_offload is refused without one, test_reliability.py checks that refusal)
    monkeypatch.setattr(fewstep.config, "has_gpu", lambda: True)


@pytest.fixture(scope="module")
def world(tiny_teacher, tiny_teacher_v, tiny_sdxl, caption_folder, tmp_path_factory):
    """Paths the keys point at, and the teacher families as --dry_run reads them (configs only)."""
    from conftest import run_args
    from fewstep.cli import main
    from fewstep.models.bundle import load_bundle
    from fewstep.testing import build_tiny_sd3

    root = tmp_path_factory.mktemp("flags")
    cache = root / "cache"
    assert main(["cache", *run_args(tiny_teacher, caption_folder, cache, resolution=32)]) == 0
    import shutil

    shutil.copytree(cache, root / "cache2")  # a second valid cache (same teacher and transform)
    sd3 = build_tiny_sd3(root / "sd3")
    families = {name: load_bundle(str(p), weights=False) for name, p in
                (("sd", tiny_teacher), ("sdxl", tiny_sdxl), ("sd3", sd3))}
    import torch

    from test_dmd2_regression import tiny_lpips_state

    for i, name in enumerate(("lpips.pth", "lpips2.pth")):  # two valid LPIPS weight files (read before a run)
        torch.save(tiny_lpips_state(seed=i), root / name)
    paths = {"{lpips}": str(root / "lpips.pth"), "{lpips2}": str(root / "lpips2.pth"), "{other_data}": str(root / "other"), "{cache}": str(cache), "{cache2}": str(root / "cache2"), "{other_teacher}": str(tiny_teacher_v)}
    common = {"pretrained_teacher_model": str(tiny_teacher), "train_data_dir": str(caption_folder),
              "output_dir": str(root / "out"), "resolution": 32}
    return paths, families, common


def _fill(value, paths):
    return paths.get(value, value) if isinstance(value, str) else value


def _raw(method, common, base, paths):
    raw = {"method": method, **common}
    if not REGISTRY[method].needs_teacher:
        raw.pop("pretrained_teacher_model")
        raw["max_train_steps"] = 3000  # more than the teacher's VAE phase (vae_train_steps 2000)
    raw.update({k: _fill(v, paths) for k, v in base.items()})
    return {k: v for k, v in raw.items() if v is not None}


def _check(spec: RunSpec, bundle):
    """The refusals of --dry_run / the trainer once the teacher is known (no weights are loaded)."""
    REGISTRY[spec.train.method].check_setup(spec.train, spec.method, bundle)
    check_teacher_settings(spec, bundle)


def _keys(method):
    return [f.name for f in dataclasses.fields(TrainConfig)] + \
        [f.name for f in dataclasses.fields(REGISTRY[method].Config)]


def test_every_key_has_an_alternative_value():
    missing = sorted({k for m in REGISTRY for k in _keys(m)} - set(ALT) - {"method"})
    assert not missing, f"add a valid alternative value for {missing} to ALT"


def test_every_key_changes_the_used_settings_or_is_refused(world):
    paths, families, common = world
    accepted, ignored = set(), []
    for method in REGISTRY:
        fams = ["sd"] if not REGISTRY[method].needs_teacher else list(families)
        for base in BASES[method]:
            raw0 = _raw(method, common, base, paths)
            spec0 = resolve(raw0, REGISTRY)
            for fam in fams:
                bundle = families[fam]
                try:
                    _check(spec0, bundle)
                except ConfigError:
                    continue  # this method (or base) does not apply to this family (e.g. LCD on SD3)
                used0 = used_settings(spec0, bundle)
                for key in _keys(method):
                    if key == "method":
                        continue
                    current = getattr(spec0.train if hasattr(spec0.train, key) else spec0.method, key)
                    value = not current if isinstance(current, bool) else \
                        next((_fill(v, paths) for v in ALT[key] if _fill(v, paths) != current), None)
                    assert value is not None, f"ALT[{key!r}] has no value other than {current!r}"
                    try:
                        spec1 = resolve({**raw0, key: value}, REGISTRY)
                        _check(spec1, bundle)
                    except ConfigError:
                        continue  # refused: the user is told
                    accepted.add(key)
                    if used_settings(spec1, bundle) == used0:
                        ignored.append(f"--{key} {value!r} with --method {method} {base} on {fam}")
    assert not ignored, "options parsed and silently ignored:\n  " + "\n  ".join(ignored)
    # every alternative value is a valid one somewhere (else the refusals above would prove nothing)
    # --regression_loss lpips needs --lpips_weights and mse refuses it: one key changed alone is always refused;
    # the pair is accepted in the lpips base above, where --lpips_weights is checked to be used.
    never = sorted({k for m in REGISTRY for k in _keys(m)} - accepted - {"method", "regression_loss"} - ONLY_DEFAULT)
    assert not never, f"these keys were refused in every combination: is their ALT value valid? {never}"


@pytest.mark.parametrize("argv,match", [
    (["--method", "dmd2", "--fake_score_lora_alpha", "8"], "--fake_score_lora_rank"),
    (["--method", "direct", "--lora_alpha", "8"], "--lora_rank"),
    (["--method", "direct", "--lora_dropout", "0.1"], "--lora_rank"),
    (["--method", "direct", "--proportion_empty_prompts", "0.1"], "mislabel"),
    (["--method", "teacher", "--proportion_empty_prompts", "0.1", "--max_train_steps", "3000"], "--caption_dropout"),
    (["--method", "lcm", "--huber_c", "0.01"], "--loss_type huber"),
    (["--method", "dmd2", "--generator_lr", "1e-5", "--guidance_lr", "1e-5", "--learning_rate", "1e-4"],
     "--learning_rate has no effect"),
    (["--report_to", "none", "--logging_dir", "x"], "--logging_dir"),
    (["--cast_teacher_unet"], "--mixed_precision"),
])
def test_named_refusals(argv, match, world):
    """The issue's examples, each refused with the fix in the message (exit 2 from the command line)."""
    from fewstep.cli import main

    paths, families, common = world
    args = [x for k, v in common.items() for x in (f"--{k}", str(v))]
    if "teacher" in argv:
        i = args.index("--pretrained_teacher_model")
        args = args[:i] + args[i + 2:]
    with pytest.raises(ConfigError, match=match):
        from fewstep.cli import parse_run

        parse_run(args + argv)
    assert main(["distill", *args, *argv]) == 2


def test_fix_crop_is_refused_where_the_family_has_no_micro_conditioning(world):
    """Decided by the teacher's denoiser config (SDXL's text_time embedding), not by a family name."""
    paths, families, common = world
    spec = resolve({**common, "use_fix_crop_and_size": True}, REGISTRY)
    check_teacher_settings(spec, families["sdxl"])
    for fam in ("sd", "sd3"):
        with pytest.raises(ConfigError, match="no micro-conditioning"):
            check_teacher_settings(spec, families[fam])


# ---- the declarations against the code ---------------------------------------------------------------
RUNS = {  # one tiny real run per method (and LoRA / GAN variants): the keys read must cover the declared
    "lcm": {}, "lcm-lora": {"lora_rank": 4, "loss_type": "huber"},
    "dmd2-gan": {"method": "dmd2", "dfake_gen_update_ratio": 1, "cls_on_clean_image": True},
    "direct-lora": {"method": "direct", "lora_rank": 4},
    "disback": {"method": "disback", "dfake_gen_update_ratio": 1, "degradation_steps": 1, "degradation_interval": 1,
                "interval": 1, "max_train_steps": 3},
    "teacher": {"method": "teacher", "teacher_preset": "tiny", "vae_train_steps": 1},
}
# Keys read outside the traced run (the command line), only on CUDA machines, or only when something
# goes wrong (bad samples, non-finite losses).
NOT_READ_HERE = {"dry_run", "cudnn_benchmark", "max_bad_fraction", "max_nan_steps"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("lcm", "teacher") else n
                                  for n in RUNS])
def test_declared_keys_are_read_by_a_real_run(name, tiny_teacher, caption_folder, tmp_path, monkeypatch):
    """Runs two steps, a validation grid and the export with every config attribute read recorded: each
    key ``used_settings`` declares must have been read, else the declaration claims a use the code
    does not make (and the matrix above would wave an ignored option through)."""
    from conftest import run_args
    from fewstep.cli import parse_run
    from fewstep.training.trainer import Trainer

    kw = dict(RUNS[name])
    if kw.get("method") == "direct":
        from fewstep.generate import generate

        data = tmp_path / "data"
        generate(str(tiny_teacher), str(data), ["a photo of a cat"] * 2, teacher_steps=2, teacher_guidance_scale=2.0,
                 student_steps=2, student_guidance_scale=1.0, resolution=32, batch_size=2)
    else:
        data = caption_folder
    kw.setdefault("max_train_steps", 2)
    argv = run_args(tiny_teacher, data, tmp_path / "o", validation_steps=2, validation_inference_steps="1",
                    validation_prompts="a cat", report_to="tensorboard", **kw)
    if kw.get("method") == "teacher":
        i = argv.index("--pretrained_teacher_model")
        argv = argv[:i] + argv[i + 2:]
    spec = parse_run(argv)
    declared = set(used_settings(spec)) & ({f.name for f in dataclasses.fields(TrainConfig)}
                                          | {f.name for f in dataclasses.fields(type(spec.method))})
    seen: set[str] = set()
    tracing = [True]
    for obj in (spec.train, spec.method):
        names = {f.name for f in dataclasses.fields(obj)}
        cls = type(obj)

        def getattribute(self, attr, _names=names, _cls=cls):
            if tracing[0] and attr in _names:
                seen.add(attr)
            return _cls.__getattribute__(self, attr)

        obj.__class__ = type(cls.__name__, (cls,), {"__getattribute__": getattribute})
    real_to_dict = RunSpec.to_dict

    def quiet_to_dict(self):  # the config dump reads every field: not a use
        tracing[0] = False
        try:
            return real_to_dict(self)
        finally:
            tracing[0] = True

    monkeypatch.setattr(RunSpec, "to_dict", quiet_to_dict)
    Trainer(spec).train()
    unread = sorted(declared - seen - NOT_READ_HERE)
    assert not unread, f"declared as used but never read by the run: {unread}"
    assert (Path(spec.train.output_dir) / "README.md").is_file()
