"""DeepSpeed ZeRO-2 and ZeRO-3 through ``accelerate launch`` on two CPU processes (gloo), against one plain
process at the same global batch: losses, exported weights, the bytes each rank holds, checkpoints and
exact resume, ``fewstep export --from_checkpoint`` of the engines' partitions, a reload in vanilla diffusers.

deepspeed is an optional extra (``pip install 'fewstep[deepspeed]'``). It requires torch, so on a machine whose
torch is a CPU build, install it without letting pip resolve a CUDA torch:

    pip install --no-deps deepspeed hjson py-cpuinfo msgpack ninja einops   # (pydantic, psutil: already there)

DeepSpeed's CPU accelerator compiles a small shared-memory op at the first launch (ninja and a C++
compiler: a few seconds). Without deepspeed these tests are skipped; the ones that only read settings run
always.

ZeRO-2 runs with the shipped configs/accelerate/deepspeed_zero2.yaml. ZeRO-3 runs with a DeepSpeed JSON
(written below) that differs from the shipped deepspeed_zero3.yaml in two settings, both for the
comparison's sake: ``stage3_param_persistence_threshold: 0`` partitions every parameter of the tiny UNet
(DeepSpeed keeps tensors under 100k elements whole on every rank by default, and all of this UNet's are:
the gathers of exports, EMA updates and validation would not be exercised), and ``memory_efficient_linear:
false`` keeps torch's own linear (DeepSpeed's replacement computes x·Wᵀ and the bias in two steps: rounding
differences of ~1e-7 per forward, ~2e-5 of the weights after 3 Adam steps, over the 1e-5 compared here).
One test runs the shipped deepspeed_zero3.yaml as it is, at a tolerance that allows that rounding.

Each launch costs 20-40 s on the 2-core test machine: every DeepSpeed launch is in the slow tier.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_args
from test_sharding_multiprocess import assert_close, losses, student

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIGS = ROOT / "configs" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(
    not HAS_DEEPSPEED, reason="deepspeed is not installed: pip install 'fewstep[deepspeed]' (on a CPU-only torch: "
    "pip install --no-deps deepspeed hjson py-cpuinfo msgpack ninja einops; see this file's docstring)")

CASES = {
    "lcm": dict(method="lcm"),
    "lcm-lora": dict(method="lcm", lora_rank=4, ema_decay=0.9),  # (the EMA adapter lives inside the engine)
}
UNET = "unet/diffusion_pytorch_model.safetensors"
LORA = "pytorch_lora_weights.safetensors"


def zero3_config(folder: Path) -> Path:
    """An accelerate config for ZeRO-3 through a DeepSpeed JSON (see the module doc for its two settings)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                "memory_efficient_linear": False}}
    (folder / "zero3.json").write_text(json.dumps(ds))
    (folder / "zero3.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_machines: 1\nnum_processes: 2\n"
        f"use_cpu: false\ndeepspeed_config:\n  deepspeed_config_file: {folder / 'zero3.json'}\n"
        "  zero3_init_flag: false\n")
    return folder / "zero3.yaml"


def config_for(stage: int, tmp_path: Path) -> Path:
    return CONFIGS / "deepspeed_zero2.yaml" if stage == 2 else zero3_config(tmp_path / "cfg")


def _args(teacher, data, out, procs: int, **kw):
    # per-device batch 2; one process accumulates 2 micro-batches: global batch 4 either way. Per-batch
    # random streams: a micro-batch draws the same noise whichever process runs it.
    base = dict(train_batch_size=2, gradient_accumulation_steps=2 if procs == 1 else 1, max_train_steps=3,
                checkpointing_steps=100, rng_streams="batch", learning_rate=1e-3)
    base.update(kw)
    return run_args(teacher, data, out, **base)


def ds_launch(config: Path, args, driver=True, timeout=600):
    """The test driver (or `fewstep distill`) on 2 DeepSpeed processes: accelerate launch with ``config``."""
    target = [str(HERE / "shard_driver.py")] if driver else ["-m", "fewstep", "distill"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
           "--main_process_port", str(free_port()), *target, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def one_process(args, driver=True, timeout=600):
    target = [str(HERE / "shard_driver.py")] if driver else ["-m", "fewstep", "distill"]
    return subprocess.run([sys.executable, *target, *args], capture_output=True, text=True, timeout=timeout, env=ENV)


def _ok(r):
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-5000:])


def export_from(ckpt: Path, out: Path):
    r = subprocess.run([sys.executable, "-m", "fewstep", "export", "--from_checkpoint", str(ckpt), "--output_dir",
                        str(out)], capture_output=True, text=True, timeout=600, env=ENV)
    _ok(r)


def engine_files(ckpt: Path) -> set[str]:
    """The files the DeepSpeed engine wrote into a checkpoint (both ranks' partitions of the module and of
    the optimizer), as paths inside the checkpoint."""
    return {str(p.relative_to(ckpt)) for p in (ckpt / "pytorch_model").iterdir()}


@pytest.fixture(scope="module")
def reference(tiny_teacher, caption_folder, tmp_path_factory):
    """The plain one-process run of each case (2 accumulation steps of 2), made once per module."""
    done: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in done:
            out = tmp_path_factory.mktemp(f"one-{case}")
            _ok(one_process(_args(tiny_teacher, caption_folder, out, 1, checkpointing_steps=3, **CASES[case])))
            done[case] = out
        return done[case]

    return get


@needs_deepspeed
@pytest.mark.slow  # 1 DeepSpeed launch (+ the shared one-process run, an export), 40-70 s on 2 shared cores
@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_deepspeed_two_processes_equal_one_process(case, stage, reference, tiny_teacher, caption_folder, tmp_path):
    """2 processes under ZeRO-2 / ZeRO-3 = 1 plain process at global batch 4: per-step losses within 1e-5,
    exported weights within 1e-5 of their norm. The ZeRO-3 run also samples its validation grid (every
    rank takes part in the forward's gathers). Each rank holds half the optimizer state, and under ZeRO-3
    none of the UNet's parameters; the checkpoint holds both ranks' engine partitions, all in its manifest,
    and `fewstep export --from_checkpoint` of them writes the run's own export."""
    one = reference(case)
    ds = tmp_path / "ds"
    extra = dict(validation_steps=2) if stage == 3 else {}
    _ok(ds_launch(config_for(stage, tmp_path), _args(tiny_teacher, caption_folder, ds, 2, checkpointing_steps=3,
                                                      **CASES[case], **extra)))
    ref, got = losses(one), losses(ds)
    assert list(ref) == ["0", "1", "2"] and got.keys() == ref.keys()
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-5), k
    assert_close(student(one), student(ds))
    if case == "lcm":  # the weights moved (the comparison is not between untouched copies)
        from safetensors.torch import load_file

        start = load_file(str(Path(tiny_teacher) / UNET))
        assert [k for k, v in student(ds).items() if k in start and not torch.equal(v, start[k])]
    else:  # the EMA adapter (frozen, inside the engine: partitioned under ZeRO-3) = the one-process one
        from safetensors.torch import load_file

        from fewstep.training.zero import consolidated

        mine = consolidated(ds / "checkpoint-3", 0, "student")
        ema = {k: v for k, v in mine.items() if ".ema." in k}
        assert ema and all(float(v.abs().sum()) > 0 for k, v in ema.items() if "lora_B" in k)  # (B starts at 0)
        theirs = load_file(str(one / "checkpoint-3" / "model.safetensors"))
        assert_close({k: theirs[k] for k in ema}, ema)
    if stage == 3:
        assert sorted(p.name for p in (ds / "validation").iterdir()) == ["step-0000002.png"]

    # what each rank holds (shard_driver.py: bytes of this rank's tensors)
    whole = json.loads((one / "held_rank0.json").read_text())["student"]
    for r in (0, 1):
        held = json.loads((ds / f"held_rank{r}.json").read_text())["student"]
        assert held["optimizer_state"] == pytest.approx(whole["optimizer_state"] / 2, rel=0.01), (r, held)
        assert held["module_params"] == (0 if stage == 3 else whole["module_params"]), (r, held)

    ckpt = ds / "checkpoint-3"
    manifest = json.loads((ckpt / "fewstep_complete").read_text())["files"]
    files = engine_files(ckpt)
    # each rank's partition of the optimizer (fp32 master weights and moments); the module: one file under
    # ZeRO-2 (whole on every rank), one per rank under ZeRO-3
    model = ({f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)} if stage == 3
             else {"mp_rank_00_model_states.pt"})
    wanted = {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} | model
    assert {f"pytorch_model/{n}" for n in wanted} <= files <= set(manifest)
    again = tmp_path / "exported"
    export_from(ckpt, again)
    if case == "lcm":
        assert (again / UNET).read_bytes() == (ds / UNET).read_bytes()
    else:  # (the LoRA file's header holds a dict whose order safetensors does not fix: compare contents)
        from safetensors import safe_open

        for f in (again / LORA, ds / LORA):
            assert f.is_file()
        with safe_open(str(again / LORA), "pt") as a, safe_open(str(ds / LORA), "pt") as b:
            assert a.metadata() == b.metadata() and set(a.keys()) == set(b.keys())
            for k in a.keys():
                assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


@needs_deepspeed
@pytest.mark.slow  # 3 DeepSpeed launches, 1.5-2 minutes on 2 shared cores
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_is_exact_and_export_loads_in_diffusers(stage, tiny_teacher, caption_folder, tmp_path):
    """4 straight steps vs 2 steps, then a resume from checkpoint-2 (DeepSpeed's engine folder read back by
    accelerate's load_state, fewstep's EMA target from its own state) to 4: the same exported bytes. The
    export loads in vanilla diffusers (StableDiffusionPipeline) and holds what the file holds."""
    config = config_for(stage, tmp_path)

    def args(out, **kw):
        return _args(tiny_teacher, caption_folder, out, 2, **{"max_train_steps": 4, "checkpointing_steps": 2, **kw})

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _ok(ds_launch(config, args(straight), driver=False))
    _ok(ds_launch(config, args(resumed, max_train_steps=2), driver=False))
    (resumed / UNET).unlink()  # (the 2-step export: the resumed run must write its own)
    _ok(ds_launch(config, args(resumed, resume_from_checkpoint="latest"), driver=False))
    for f in (UNET, "scheduler/scheduler_config.json"):
        assert (straight / f).read_bytes() == (resumed / f).read_bytes(), f
    # the checkpoint-2 the resume read was the engine's (the run did not start over)
    assert engine_files(resumed / "checkpoint-2") <= set(
        json.loads((resumed / "checkpoint-2" / "fewstep_complete").read_text())["files"])

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionPipeline.from_pretrained(str(straight), safety_checker=None)
    saved = load_file(str(straight / UNET))
    assert {k: v for k, v in pipe.unet.state_dict().items()}.keys() == saved.keys()
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert all(torch.isfinite(v).all() for v in saved.values())
    image = pipe("a handwritten digit three", num_inference_steps=2, guidance_scale=1.0, height=32, width=32,
                 output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and float(image.std()) > 0


@needs_deepspeed
@pytest.mark.slow  # 1 DeepSpeed launch (+ the shared one-process run)
def test_shipped_zero3_config_runs_within_rounding(reference, tiny_teacher, caption_folder, tmp_path):
    """configs/accelerate/deepspeed_zero3.yaml as shipped (2 processes; fewstep's --mixed_precision no decides
    the precision): the run finishes and agrees with one process up to DeepSpeed's own linear's rounding (see
    the module doc: a wrong shard, a missed update or a mis-seeded rank is off by 1e-2 or more)."""
    one = reference("lcm")
    ds = tmp_path / "ds"
    _ok(ds_launch(CONFIGS / "deepspeed_zero3.yaml", _args(tiny_teacher, caption_folder, ds, 2, checkpointing_steps=3)))
    ref, got = losses(one), losses(ds)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], rel=1e-4), k
    assert_close(student(one), student(ds), rel=1e-4, per_tensor=2e-3)


@needs_deepspeed
@pytest.mark.slow  # 1 DeepSpeed launch that stops after loading the teacher, ~20 s
def test_two_trained_networks_refused_under_deepspeed(tiny_teacher, caption_folder, tmp_path):
    """DMD2 trains a generator and a fake score, each with its optimizer; accelerate's DeepSpeed gives one
    engine: refused with the fix named (exit 2), before any step or file."""
    out = tmp_path / "dmd2"
    r = ds_launch(CONFIGS / "deepspeed_zero2.yaml", _args(tiny_teacher, caption_folder, out, 2, method="dmd2"),
                  driver=False)
    assert r.returncode != 0
    assert "accelerate's DeepSpeed integration gives a run one engine" in r.stderr
    assert "configs/accelerate/fsdp.yaml" in r.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "unet").exists()


# ---- the settings fewstep reads from a DeepSpeed config (no deepspeed needed) ----------------------

def _resolve(monkeypatch, env: dict[str, str], argv: list[str]):
    from fewstep.cli import parse_run

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return parse_run(["--method", "lcm", "--pretrained_teacher_model", "T", "--train_data_dir", "D", *argv]).train


def test_deepspeed_config_values_become_the_settings(monkeypatch, tmp_path):
    """The launcher passes the yaml's deepspeed_config as environment variables: its accumulation and
    clipping become --gradient_accumulation_steps / --max_grad_norm (the engine applies them), a JSON's
    micro-batch becomes --train_batch_size; "auto" leaves fewstep's own."""
    cfg = _resolve(monkeypatch, {"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4", "ACCELERATE_GRADIENT_CLIPPING": "0.5"},
                   [])
    assert (cfg.gradient_accumulation_steps, cfg.max_grad_norm) == (4, 0.5)
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": "auto",
                             "gradient_clipping": "auto", "zero_optimization": {"stage": 3}}))
    monkeypatch.delenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    monkeypatch.delenv("ACCELERATE_GRADIENT_CLIPPING")
    cfg = _resolve(monkeypatch, {"ACCELERATE_DEEPSPEED_CONFIG_FILE": str(f)}, ["--gradient_accumulation_steps", "2"])
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps, cfg.max_grad_norm) == (3, 2, 1.0)


@pytest.mark.parametrize("env,argv,words", [
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "1"}, ["--gradient_accumulation_steps", "2"],
     "--gradient_accumulation_steps 2 contradicts"),
    ({"ACCELERATE_GRADIENT_CLIPPING": "1.0"}, ["--max_grad_norm", "0.3"], "--max_grad_norm 0.3 contradicts"),
    ({"ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, [], "zero3_init_flag: false"),
    ({"json": {"bf16": {"enabled": True}}}, [], "turns bf16 on, and --mixed_precision is no"),
    ({}, ["--fsdp", "true"], "--fsdp and an accelerate DeepSpeed config exclude each other"),
])
def test_deepspeed_config_contradictions_refused(env, argv, words, monkeypatch, tmp_path):
    from fewstep.config import ConfigError

    env = dict(env)
    if "json" in env:
        f = tmp_path / "ds.json"
        f.write_text(json.dumps(env.pop("json")))
        env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] = str(f)
    with pytest.raises(ConfigError, match=words.replace("-", "\\-").replace(".", "\\.")):
        _resolve(monkeypatch, env, argv)


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_shipped_deepspeed_configs_as_each_rank_reads_them(name, monkeypatch):
    """The shipped yaml through accelerate's own launcher code (the environment each rank gets): its
    accumulation and clipping are fewstep's settings; a command line that contradicts them is refused."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    from fewstep.config import ConfigError

    args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / f"{name}.yaml"), "-m", "fewstep"])
    args = _validate_launch_command(args)[0]
    args.deepspeed_fields_from_accelerate_config = "zero_stage,gradient_accumulation_steps,gradient_clipping"
    env = prepare_deepspeed_cmd_env(args)[1]
    assert env["ACCELERATE_USE_DEEPSPEED"] == "true" and env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == name[-1]
    ds = {k: v for k, v in env.items() if k.startswith("ACCELERATE_") and k != "ACCELERATE_USE_DEEPSPEED"}
    cfg = _resolve(monkeypatch, ds, ["--max_grad_norm", "1.0"])
    assert (cfg.gradient_accumulation_steps, cfg.max_grad_norm) == (1, 1.0)
    with pytest.raises(ConfigError, match="--gradient_accumulation_steps 4 contradicts"):
        _resolve(monkeypatch, ds, ["--gradient_accumulation_steps", "4"])
