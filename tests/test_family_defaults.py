"""Recipe defaults that depend on the teacher's family (issue 15 items 3 and 7): the table names only
real methods, families and keys; each family gets its reference's values; values the user gives always
win; --dry_run prints each default with its source; a run built in Python gets them too."""

import dataclasses

import pytest

from conftest import run_args
from fewstep.cli import main, method_configs, parse_run
from fewstep.config import ConfigError, TrainConfig, resolve
from fewstep.methods.base import _family_table
from fewstep.models.bundle import family_classes


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from fewstep.testing import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("fd") / "sd3")


def test_the_table_names_real_methods_families_and_keys():
    methods = method_configs()
    labels = {cls.family for cls in family_classes()} | {"*"}
    table = _family_table()
    assert table
    common = {f.name for f in dataclasses.fields(TrainConfig)}
    for name, families in table.items():
        assert name in methods, name
        keys = common | {f.name for f in dataclasses.fields(methods[name].Config)}
        for label, rules in families.items():
            assert label in labels, label
            for rule in rules:
                assert set(rule) <= {"set", "when", "source"} and rule["source"].strip()
                assert set(rule["set"]) <= keys and set(rule.get("when") or {}) <= keys, rule


def test_lcd_guidance_range_per_family(tiny_teacher, tiny_sdxl, caption_folder, tmp_path):
    """diffusers' SD scripts draw w from [5, 15], its SDXL scripts from [3, 15]."""
    sd = parse_run(run_args(tiny_teacher, caption_folder, tmp_path))
    xl = parse_run(run_args(tiny_sdxl, caption_folder, tmp_path))
    assert (sd.teacher_family, sd.method.w_min, sd.method.w_max) == ("sd", 5.0, 15.0)
    assert (xl.teacher_family, xl.method.w_min, xl.method.w_max) == ("sdxl", 3.0, 15.0)
    assert [d.key for d in xl.applied] == ["w_min"] and "train_lcm_distill_sdxl_wds.py" in xl.applied[0].source
    mine = parse_run(run_args(tiny_sdxl, caption_folder, tmp_path, w_min=4.0))
    assert mine.method.w_min == 4.0 and not mine.applied
    assert [(d.key, v) for d, v in mine.overridden] == [("w_min", 4.0)]
    # A check that fails because of a family default says so.
    with pytest.raises(ConfigError, match=r"got 3.0 and 2.0 \(family defaults for 'sdxl' in force: --w_min 3.0"):
        parse_run(run_args(tiny_sdxl, caption_folder, tmp_path, w_max=2.0))


@pytest.mark.parametrize("teacher,weights", [("tiny_teacher", (1e-3, 1e-2)), ("tiny_sdxl", (5e-3, 1e-2)),
                                             ("tiny_sd3", (5e-3, 1e-2))])
def test_cls_on_clean_image_weights_per_family(teacher, weights, caption_folder, tmp_path, request):
    """Item 7: DMD2's SD1.5 GAN run uses 1e-3 / 1e-2, its SDXL runs 5e-3 / 1e-2; SD3 (no reference) takes
    the SDXL values and says so."""
    root = request.getfixturevalue(teacher)
    spec = parse_run(run_args(root, caption_folder, tmp_path, method="dmd2", cls_on_clean_image=True))
    assert (spec.method.gen_cls_loss_weight, spec.method.guidance_cls_loss_weight) == weights
    sources = {d.key: d.source for d in spec.applied}
    assert ("no DMD2 recipe" in sources["gen_cls_loss_weight"]) == (teacher == "tiny_sd3")
    # Without the switch the GAN stays off; an explicit weight wins.
    off = parse_run(run_args(root, caption_folder, tmp_path, method="dmd2"))
    assert (off.method.gen_cls_loss_weight, off.method.guidance_cls_loss_weight) == (0.0, 0.0)
    mine = parse_run(run_args(root, caption_folder, tmp_path, method="dmd2", cls_on_clean_image=True,
                              gen_cls_loss_weight=2e-3))
    assert (mine.method.gen_cls_loss_weight, mine.method.guidance_cls_loss_weight) == (2e-3, 1e-2)


def test_dmd2_sdxl_recipe(tiny_sdxl, caption_folder, tmp_path):
    one = parse_run(run_args(tiny_sdxl, caption_folder, tmp_path, method="dmd2"))
    m = one.method
    assert (m.real_guidance_scale, m.dfake_gen_update_ratio, m.conditioning_timestep) == (8.0, 5, 399)
    four = parse_run(run_args(tiny_sdxl, caption_folder, tmp_path, method="dmd2", num_denoising_step=4))
    assert four.method.conditioning_timestep == 999  # the 399 rule is for one-step generators only
    dis = parse_run(run_args(tiny_sdxl, caption_folder, tmp_path, method="disback"))
    assert (dis.method.real_guidance_scale, dis.method.dfake_gen_update_ratio) == (8.0, 5)  # inherited
    # Both GAN weights set to 0 by hand leave nothing for the switch to turn on: refused.
    with pytest.raises(ConfigError, match="cls_on_clean_image"):
        main_args = run_args(tiny_sdxl, caption_folder, tmp_path / "o", method="dmd2", cls_on_clean_image=True,
                             gen_cls_loss_weight=0, guidance_cls_loss_weight=0)
        from fewstep.training.trainer import Trainer

        Trainer(parse_run(main_args))


def test_dry_run_prints_each_default_and_whose_value_won(tiny_sdxl, caption_folder, tmp_path, capsys):
    assert main(["distill", *run_args(tiny_sdxl, caption_folder, tmp_path / "o"), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "family defaults for teacher family 'sdxl' (values you give always win):" in out
    assert "--w_min 3.0  [diffusers examples/consistency_distillation" in out
    assert "w_min: 3.0" in out  # the resolved config
    assert main(["distill", *run_args(tiny_sdxl, caption_folder, tmp_path / "o", w_min=4), "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "--w_min 4.0: yours, instead of the family's 3.0" in out


def test_a_run_built_in_python_gets_the_family_defaults(tiny_sdxl, caption_folder, tmp_path):
    from fewstep.training.trainer import Trainer

    cfg = dict(method="lcm", pretrained_teacher_model=str(tiny_sdxl), train_data_dir=str(caption_folder),
               output_dir=str(tmp_path / "o"), resolution=32, train_batch_size=2, report_to="none",
               validation_steps=0)
    spec = resolve(cfg, method_configs())
    assert spec.teacher_family is None and spec.method.w_min == 5.0
    tr = Trainer(spec)
    assert tr.spec.teacher_family == "sdxl" and tr.method.mcfg.w_min == 3.0


def test_resuming_a_run_recorded_with_another_value_warns(tiny_sdxl, caption_folder, tmp_path, caplog):
    """A run trained before a family default existed (here: recorded with w_min 5 on SDXL) and resumed
    without the key would switch recipe mid-run: the trainer says so and how to keep the old value."""
    import logging

    out = tmp_path / "o"
    assert main(["distill", *run_args(tiny_sdxl, caption_folder, out, w_min=5.0, max_train_steps=1,
                                      checkpointing_steps=1)]) == 0
    from fewstep.training.trainer import Trainer

    tr = Trainer(parse_run(run_args(tiny_sdxl, caption_folder, out, max_train_steps=2,
                                    resume_from_checkpoint="latest")))
    with caplog.at_level(logging.WARNING, logger="fewstep"):
        tr.start()
    assert "--w_min is 3.0 now" in caplog.text
    assert "give --w_min 5.0 to keep training as before" in caplog.text
