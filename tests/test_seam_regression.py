"""The UNet paths through the model interface: every method's losses over three optimizer steps on the
tiny SD1.5 (ε and v) and SDXL teachers, recorded on the code before the model interface was rebuilt
(issue 17), so that rebuilding it provably changed nothing a UNet run computes.

The losses of steps 2 and 3 depend on the weights the earlier steps wrote, so gradients, optimizer
steps and EMA updates are covered as well as the forward math. Recorded on CPU (torch 2.13, diffusers
0.42, 2 threads); the rebuilt interface reproduces every value bit for bit (printed and compared), and
the test allows 1e-6 relative, a few float32 ulps, for other CPUs. How little it takes to exceed that:
writing LCD's CFG as D(∅) + (1 + w)(D(c) − D(∅)) instead of D(c) + w (D(c) − D(∅)), the same value up
to rounding, moved the first loss by 5e-7 and the third by 5e-5 (relative).

Run ``python tests/test_seam_regression.py`` to print the values of the current code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import run_args  # noqa: E402

STEPS = 3

# (teacher fixture, method options); every run: seed 0, batch 2, lr 1e-3, 32 px.
CASES = {
    "sd-eps/lcm": ("eps", dict(method="lcm", loss_type="huber")),
    "sd-eps/lcm-lora-ema": ("eps", dict(method="lcm", lora_rank=4, ema_decay=0.9)),
    "sd-v/lcm": ("v", dict(method="lcm")),
    "sd-eps/dmd2-gan": ("eps", dict(method="dmd2", dfake_gen_update_ratio=1, gen_cls_loss_weight=5e-3,
                                    guidance_cls_loss_weight=1e-2, real_guidance_scale=1.75)),
    "sd-v/dmd2-lora-fake": ("v", dict(method="dmd2", dfake_gen_update_ratio=1, fake_score_lora_rank=4,
                                      real_guidance_scale=2.0)),
    "sd-eps/dmd2-multistep-bs": ("eps", dict(method="dmd2", dfake_gen_update_ratio=1, num_denoising_step=4,
                                             backward_simulation=True)),
    "sd-eps/disback-lora": ("eps", dict(method="disback", dfake_gen_update_ratio=1, fake_score_lora_rank=4,
                                        degradation_steps=1, degradation_interval=1, interval=1,
                                        max_train_steps=6)),
    "sd-eps/direct": ("eps-data", dict(method="direct")),
    "sd-eps/direct-trajectory-lora": ("eps-data", dict(method="direct", direct_variant="trajectory",
                                                       lora_rank=4)),
    "sdxl/lcm": ("sdxl", dict(method="lcm")),
    "sdxl/lcm-lora": ("sdxl", dict(method="lcm", lora_rank=4)),
    "sdxl/dmd2-gan-lora": ("sdxl", dict(method="dmd2", dfake_gen_update_ratio=1, fake_score_lora_rank=4,
                                        gen_cls_loss_weight=5e-3, guidance_cls_loss_weight=1e-2,
                                        conditioning_timestep=399)),
    "sd3/direct": ("sd3-data", dict(method="direct")),
    "teacher": ("none", dict(method="teacher", teacher_preset="tiny", vae_train_steps=1)),
}

# Printed by `python tests/test_seam_regression.py` on the code before issue 17 (commit 7e9d535).
RECORDED = {
    "sd-eps/lcm": [0.057922884821891785, 0.18422268331050873, 0.9008585810661316],
    "sd-eps/lcm-lora-ema": [0.005001252517104149, 0.3551732301712036, 0.019429979845881462],
    "sd-v/lcm": [0.001782373758032918, 0.021364012733101845, 0.03837459161877632],
    "sd-eps/dmd2-gan": [0.0034678420051932335, 1.2062928676605225, 0.017354540526866913],
    "sd-v/dmd2-lora-fake": [0.013164925388991833, 0.9683350920677185, 0.005429595243185759],
    "sd-eps/dmd2-multistep-bs": [0.0002381530503043905, 1.2181085348129272, 0.002848514588549733],
    "sd-eps/disback-lora": [1.0871224403381348, 0.00010518155613681301, 1.1397818326950073],
    "sd-eps/direct": [121.87823486328125, 114.85659790039062, 82.57331085205078],
    "sd-eps/direct-trajectory-lora": [73.12523651123047, 78.6968765258789, 75.48310852050781],
    "sdxl/lcm": [0.15183265507221222, 0.13827307522296906, 0.186237633228302],
    "sdxl/lcm-lora": [0.0023270882666110992, 0.014996953308582306, 0.006426490843296051],
    "sdxl/dmd2-gan-lora": [0.003924564458429813, 0.9845520853996277, 0.004328472539782524],
    "sd3/direct": [0.010328525677323341, 0.019489014521241188, 0.006723739206790924],
    # re-recorded: the teacher method's latents are now contiguous (torch.randn_like drew other noise for the
    # channels-last latents the CPU VAE returns; found when its cached and on-the-fly losses differed)
    "teacher": [0.2646254301071167, 1.1519896984100342, 1.0505263805389404],
}


def _losses(teacher, data, out, opts) -> list[float]:
    from fewstep.cli import parse_run
    from fewstep.training.trainer import Trainer

    kw = dict(learning_rate=1e-3, max_train_steps=STEPS)
    kw.update(opts)
    tr = Trainer(parse_run(run_args(teacher, data, out, **kw)))
    tr.start()
    return [tr.step()["loss"] for _ in range(STEPS)]


def _direct_data(teacher, out) -> Path:
    from fewstep.generate import generate

    generate(str(teacher), str(out), ["a handwritten digit three", "a photo of a cat"], teacher_steps=4,
             teacher_guidance_scale=3.0, student_steps=2, student_guidance_scale=1.0, images_per_prompt=2, seed=10,
             save_latents=True, batch_size=4, progress=False)
    return out


@pytest.fixture(scope="module")
def direct_data(tiny_teacher, tmp_path_factory):
    return _direct_data(tiny_teacher, tmp_path_factory.mktemp("seam") / "direct")


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from fewstep.testing import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("seam") / "sd3")


@pytest.fixture(scope="module")
def sd3_direct_data(tiny_sd3, tmp_path_factory):
    return _direct_data(tiny_sd3, tmp_path_factory.mktemp("seam") / "sd3-direct")


def _inputs(kind, fixtures):
    teacher = {"eps": "tiny_teacher", "eps-data": "tiny_teacher", "v": "tiny_teacher_v", "sdxl": "tiny_sdxl",
               "sd3-data": "tiny_sd3", "none": None}[kind]  # (a teacher trained from scratch takes none)
    data = {"eps-data": "direct_data", "sd3-data": "sd3_direct_data"}.get(kind, "caption_folder")
    return (fixtures(teacher) if teacher else None), fixtures(data)


@pytest.mark.parametrize("case", list(CASES))
def test_unet_losses_equal_the_recorded_ones(case, request, tmp_path):
    kind, opts = CASES[case]
    teacher, data = _inputs(kind, request.getfixturevalue)
    got = _losses(teacher, data, tmp_path / "o", opts)
    assert got == pytest.approx(RECORDED[case], rel=1e-6), f"{case}: {got!r}"


if __name__ == "__main__":  # print the values of the current code, to record them
    import tempfile

    import torch

    from fewstep.testing import build_tiny_sd, build_tiny_sd3, build_tiny_sdxl, write_caption_folder

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fx = {"tiny_teacher": build_tiny_sd(tmp / "t-eps", prediction_type="epsilon"),
              "tiny_teacher_v": build_tiny_sd(tmp / "t-v", prediction_type="v_prediction"),
              "tiny_sdxl": build_tiny_sdxl(tmp / "t-sdxl"), "tiny_sd3": build_tiny_sd3(tmp / "t-sd3"),
              "caption_folder": write_caption_folder(tmp / "data", n=12, size=40)}
        fx["direct_data"] = _direct_data(fx["tiny_teacher"], tmp / "direct")
        fx["sd3_direct_data"] = _direct_data(fx["tiny_sd3"], tmp / "sd3-direct")
        only = sys.argv[1:]
        for case, (kind, opts) in CASES.items():
            if only and case not in only:
                continue
            teacher, data = _inputs(kind, fx.__getitem__)
            print(f"    {case!r}: {_losses(teacher, data, tmp / case.replace('/', '_'), opts)!r},", flush=True)
