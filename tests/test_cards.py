"""Every model card's code block runs as written in vanilla diffusers on the CPU (issue 15, items 8, 9).

The students are distilled from the bundled MNIST teacher (the teacher a newcomer meets first, via
`fewstep demo`) by every method: LCD, LCM-LoRA, direct (full and LoRA), DMD2 and DisBack; plus the
card of a teacher trained by `fewstep train-teacher` under bf16 and the card fewstep writes for the
bundled teacher itself. Before the fix, an fp16/bf16 text encoder next to an fp32 UNet made
`DiffusionPipeline.from_pretrained(OUT)` fail ("Half != float") under transformers 5. The card picks
fp16 on a GPU, fp32 on the CPU: on a GPU machine the same test checks the fp16 load.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import card_snippet, run_args
from fewstep.cli import main
from fewstep.demo import TEACHER, write_subset_folder
from fewstep.export import model_card

PROMPT = "a handwritten digit seven"


def _run(data: Path, out: Path, **kw) -> Path:
    args = dict(train_batch_size=2, max_train_steps=2, validation_steps=0, checkpointing_steps=100,
                report_to="none", center_crop=True)
    args.update(kw)
    assert main(["distill", *run_args(TEACHER, data, out, **args)]) == 0
    return out


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """One tiny run per method from the bundled teacher; {label: output folder}."""
    root = tmp_path_factory.mktemp("cards")
    digits = write_subset_folder(root / "digits", limit=8)
    from fewstep.generate import generate

    direct_data = root / "direct_data"
    generate(str(TEACHER), str(direct_data), [PROMPT, "a handwritten digit one"], teacher_steps=2,
             teacher_guidance_scale=4.0, student_steps=2, student_guidance_scale=1.0, resolution=32, batch_size=2)
    outs = {
        "lcm": _run(digits, root / "lcm"),
        "lcm-lora": _run(digits, root / "lcm-lora", lora_rank=4),
        "dmd2": _run(digits, root / "dmd2", method="dmd2", dfake_gen_update_ratio=1, real_guidance_scale=2.0),
        "disback": _run(digits, root / "disback", method="disback", dfake_gen_update_ratio=1, real_guidance_scale=2.0,
                        degradation_steps=1, degradation_interval=1, interval=1, max_train_steps=3),
    }
    for label, kw in (("direct", {}), ("direct-lora", {"lora_rank": 4})):
        argv = run_args(TEACHER, direct_data, root / label, method="direct", train_batch_size=2, max_train_steps=1,
                        validation_steps=0, report_to="none", **kw)
        assert main(["distill", *argv]) == 0
        outs[label] = root / label
    # A teacher trained under bf16: its frozen text encoder ran (and used to be saved) in bf16.
    teacher = root / "teacher"
    argv = run_args(None, digits, teacher, method="teacher", teacher_preset="tiny", vae_train_steps=1,
                    max_train_steps=2, train_batch_size=2, mixed_precision="bf16", validation_steps=0,
                    report_to="none", teacher_inference_steps=4, learning_rate=1e-3)
    i = argv.index("--pretrained_teacher_model")
    assert main(["distill", *(argv[:i] + argv[i + 2:])]) == 0
    outs["teacher"] = teacher
    return outs


def _exec_card(code: str):
    ns: dict = {}
    exec(compile(code, "<model card>", "exec"), ns)
    return ns["pipe"], np.asarray(ns["image"])


def _dtypes(pipe) -> set:
    return {m.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module)}


@pytest.mark.parametrize("label", ["lcm", "lcm-lora", "direct", "direct-lora", "dmd2", "disback", "teacher"])
def test_card_code_runs_as_written(label, outputs):
    out = outputs[label]
    code = card_snippet(out)
    pipe, image = _exec_card(code)
    expect = torch.float16 if torch.cuda.is_available() else torch.float32
    assert _dtypes(pipe) == {expect}  # one dtype for every part, as the card asks
    assert image.shape == (32, 32, 3) and image.std() > 0
    # The card calls the pipeline with exactly the steps and guidance of fewstep_sampling.json.
    hints = json.loads((out / "fewstep_sampling.json").read_text())
    assert f"num_inference_steps={hints['num_inference_steps']}, guidance_scale={hints['guidance_scale']}" in code
    lo, hi = hints["valid_steps"]
    assert lo <= hints["num_inference_steps"] <= hi


@pytest.mark.parametrize("label", ["lcm", "direct", "dmd2", "teacher"])
def test_plain_from_pretrained_runs_on_the_cpu(label, outputs):
    """The issue's own reproduction: no dtype, no device; every part loads in fp32 and the pipeline runs."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(outputs[label])
    assert _dtypes(pipe) == {torch.float32}
    hints = json.loads((outputs[label] / "fewstep_sampling.json").read_text())
    image = pipe(PROMPT, num_inference_steps=hints["num_inference_steps"], guidance_scale=hints["guidance_scale"],
                 timesteps=hints.get("timesteps"), output_type="np").images[0]
    assert np.isfinite(image).all()


def test_bundled_teacher_card_runs(tmp_path):
    """The card fewstep writes for a teacher folder, pointed at the shipped one (its files as shipped)."""
    hints = json.loads((TEACHER / "fewstep_sampling.json").read_text())
    facts = {"scheduler": "DDIMScheduler", "num_inference_steps": hints["num_inference_steps"],
             "valid_steps": (1, 1000), "guidance_scale": hints["guidance_scale"]}
    card = model_card(TEACHER, None, "teacher", facts)
    (tmp_path / "README.md").write_text(card)
    pipe, image = _exec_card(card_snippet(tmp_path))
    assert image.shape == (32, 32, 3) and image.std() > 0
    from diffusers import DiffusionPipeline

    assert _dtypes(DiffusionPipeline.from_pretrained(TEACHER)) == {torch.float32}
    from safetensors import safe_open

    with safe_open(str(TEACHER / "text_encoder" / "model.safetensors"), "pt") as f:  # shipped in fp32
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_half_precision_teacher_gives_an_fp32_text_encoder(tmp_path):
    """A teacher saved in fp16 (common for downloaded SD folders): the student folder's text encoder is
    written in fp32, losslessly, so the folder loads in vanilla diffusers without a dtype."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from fewstep.testing import build_tiny_sd, write_caption_folder

    teacher = build_tiny_sd(tmp_path / "t")
    half = DiffusionPipeline.from_pretrained(teacher, torch_dtype=torch.float16)
    half.save_pretrained(tmp_path / "t16")
    data = write_caption_folder(tmp_path / "d", n=4, size=32)
    out = tmp_path / "out"
    assert main(["distill", *run_args(tmp_path / "t16", data, out, max_train_steps=1)]) == 0
    te16 = load_file(str(tmp_path / "t16" / "text_encoder" / "model.safetensors"))
    te = load_file(str(out / "text_encoder" / "model.safetensors"))
    assert {v.dtype for v in te16.values()} == {torch.float16} and {v.dtype for v in te.values()} == {torch.float32}
    assert all(torch.equal(te[k], te16[k].float()) for k in te16)  # lossless
    assert json.loads((out / "text_encoder" / "config.json").read_text())["dtype"] == "float32"
    pipe = DiffusionPipeline.from_pretrained(out)
    assert _dtypes(pipe) == {torch.float32}
    assert np.isfinite(pipe(PROMPT, num_inference_steps=2, output_type="np").images[0]).all()
    # the LoRA card loads this fp16 base and still runs: the card casts every part to one dtype
    lora = tmp_path / "lora"
    assert main(["distill", *run_args(tmp_path / "t16", data, lora, max_train_steps=1, lora_rank=4)]) == 0
    pipe, image = _exec_card(card_snippet(lora))
    assert image.std() > 0


def test_cards_say_what_the_student_is_trained_for(outputs):
    """One-step DMD2: exactly 1 step; LCD: its 50-point grid; direct: exactly its K; teacher: any."""
    expect = {"dmd2": ([1, 1], "exactly 1 step;"), "lcm": ([1, 50], "1–50 steps"),
              "direct": ([2, 2], "exactly 2 steps"), "teacher": ([1, 1000], "1–1000 steps")}
    for label, (valid, phrase) in expect.items():
        out = outputs[label]
        assert json.loads((out / "fewstep_sampling.json").read_text())["valid_steps"] == valid
        assert f"Trained for {phrase}" in (out / "README.md").read_text()
        assert "1–8 work" not in (out / "README.md").read_text()


def test_sample_and_eval_keep_to_the_trained_step_counts(outputs, tmp_path, capsys):
    """`fewstep sample` refuses a step count the student was not trained for (exit 2, naming the valid
    ones; diffusers itself would raise deep inside LCMScheduler); `fewstep eval` plans only valid ones."""
    from fewstep.eval.run import plan_runs

    assert main(["sample", "--model", str(outputs["dmd2"]), "--prompt", PROMPT, "--num_inference_steps", "4",
                 "--output", str(tmp_path / "x.png")]) == 2
    assert "trained for exactly 1 step" in capsys.readouterr().err
    assert main(["sample", "--model", str(outputs["dmd2"]), "--prompt", PROMPT, "--output", str(tmp_path / "y.png")]) == 0
    runs = plan_runs([("dmd2", str(outputs["dmd2"])), ("lcd", str(outputs["lcm"]))], [1, 2, 4, 8], [25], ["ddim"])
    assert [(r.label, r.steps) for r in runs] == [("dmd2", 1), ("lcd", 1), ("lcd", 2), ("lcd", 4), ("lcd", 8)]


def test_validation_rows_are_the_trained_step_counts(tmp_path):
    from fewstep.training.trainer import validation_rows

    assert validation_rows([1, 2, 4, 8], None) == [1, 2, 4, 8]
    assert validation_rows([1, 2, 4, 8], (1, 1)) == [1]  # one-step generator
    assert validation_rows([1, 2, 4, 8], (1, 4)) == [1, 2, 4]  # K = 4: LCMScheduler refuses 8
    assert validation_rows([1, 2, 4, 8], (3, 3)) == [3]  # direct distillation at K = 3
    assert validation_rows([8, 1], (1, 50)) == [8, 1]


@pytest.mark.parametrize("kw,rows", [({}, 1), ({"num_denoising_step": 2}, 2)])
def test_dmd2_validation_grid_shows_only_trained_steps(kw, rows, tiny_teacher, caption_folder, tmp_path):
    """The grid of a one-step generator has one row (not 1/2/4/8), of a 2-step one two rows."""
    from PIL import Image

    out = tmp_path / "o"
    argv = run_args(tiny_teacher, caption_folder, out, method="dmd2", dfake_gen_update_ratio=1,
                    real_guidance_scale=2.0, max_train_steps=1, validation_steps=1, validation_prompts="a|b", **kw)
    assert main(["distill", *argv]) == 0
    grid = np.asarray(Image.open(out / "validation" / "step-0000001.png"))
    assert grid.shape == (32 * rows, 32 * 2, 3)
