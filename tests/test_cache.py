"""`fewstep cache`: the cache holds what on-the-fly encoding computes, training from it gives the same
loss without a text encoder or VAE encoder in memory, and a cache made for other settings is refused."""

import json

import pytest
import torch

from conftest import run_args
from fewstep.cli import main, parse_run


def _cache(teacher, data, out, *extra):
    args = run_args(teacher, data, out, center_crop=True)
    return main(["cache", *args, *extra])


@pytest.fixture(scope="module")
def sd_cache(tiny_teacher, caption_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "c"
    assert _cache(tiny_teacher, caption_folder, out) == 0
    return out


def test_cache_contents(sd_cache, caption_folder):
    index = json.loads((sd_cache / "cache.json").read_text())
    assert index["count"] == 12 and index["family"] == "sd" and index["prompts"][0] == ""
    assert index["key"]["resolution"] == 32 and index["key"]["center_crop"] is True
    from fewstep.data.cache import CachedDataset

    ds = CachedDataset(str(sd_cache))
    item = ds[3]
    assert item["cached_moments"].shape == (8, 8, 8)  # mean ‖ logvar of 4 latent channels, 32 px / 4
    assert item["cached_text.encoder_hidden_states"].shape[0] == 16  # tokenizer length of the tiny CLIP
    assert item["caption"] in {ln.strip() for p in caption_folder.glob("*.txt") for ln in [p.read_text()]}


def _first_loss(args):
    from fewstep.training.trainer import Trainer

    tr = Trainer(parse_run(args))
    tr.start()
    # Loading a text encoder draws from the global RNG (weight init before the load); reseed so both
    # runs draw the same latent and timestep noise.
    torch.manual_seed(123)
    return tr, tr.step()


def test_training_from_cache_matches_encoding_on_the_fly(tiny_teacher, caption_folder, sd_cache, tmp_path):
    base = run_args(tiny_teacher, caption_folder, tmp_path / "a", center_crop=True)
    loss_images = _first_loss(base)[1]["loss"]
    cached = run_args(tiny_teacher, caption_folder, tmp_path / "b", center_crop=True)
    i = cached.index("--train_data_dir")
    cached[i:i + 2] = ["--cache_dir", str(sd_cache)]
    tr, logs = _first_loss(cached)
    loss_cache = logs["loss"]
    assert tr.bundle.text_encoder is None and tr.bundle.vae.encoder is None  # neither was needed
    assert loss_cache == pytest.approx(loss_images, rel=1e-5)
    # validation prompts were cached too: sampling runs without loading the text encoder
    img = tr.method.sample(["a handwritten digit zero"], [0], 1, None)
    assert img.shape == (1, 3, 32, 32) and tr.bundle.text_encoder is None


def test_dmd2_from_cache_matches_images_without_a_text_encoder(tiny_teacher, caption_folder, sd_cache, tmp_path):
    """DMD2 reads real latents (a K-step generator's input, the GAN's real side) and captions (dropped at
    random) from the cache as from images, and never loads the text encoder: both steps' losses equal
    the on-the-fly run's."""
    kw = dict(method="dmd2", center_crop=True, dfake_gen_update_ratio=1, num_denoising_step=2,
              gen_cls_loss_weight=5e-3, guidance_cls_loss_weight=1e-2, proportion_empty_prompts=0.5)
    runs = []
    for source in ("images", "cache"):
        args = run_args(tiny_teacher, caption_folder, tmp_path / source, **kw)
        if source == "cache":
            i = args.index("--train_data_dir")
            args[i:i + 2] = ["--cache_dir", str(sd_cache)]
        tr, first = _first_loss(args)
        runs.append((tr, [first, tr.step()]))
    (_, on_the_fly), (tr, cached) = runs
    assert [sorted(x) for x in cached] == [sorted(x) for x in on_the_fly]
    assert "gen_cls_loss" in cached[0] and "guidance_cls_loss" in cached[1]
    for a, b in zip(on_the_fly, cached):
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), k
    assert tr.bundle.text_encoder is None and tr.bundle.vae.encoder is None


def test_dmd2_regression_from_a_cache_is_refused(tiny_teacher, caption_folder, sd_cache, tmp_path):
    """The regression term needs each row's seed columns, which a cache does not keep."""
    from fewstep.config import ConfigError
    from fewstep.training.trainer import Trainer

    args = run_args(tiny_teacher, caption_folder, tmp_path / "o", method="dmd2", center_crop=True,
                    regression_loss_weight=1.0)
    i = args.index("--train_data_dir")
    args[i:i + 2] = ["--cache_dir", str(sd_cache)]
    with pytest.raises(ConfigError, match="not --cache_dir"):
        Trainer(parse_run(args))


def test_cache_for_other_settings_is_refused_before_loading(tiny_teacher, caption_folder, sd_cache, tmp_path, capsys):
    args = run_args(tiny_teacher, caption_folder, tmp_path / "o", center_crop=True, resolution=64)
    i = args.index("--train_data_dir")
    args[i:i + 2] = ["--cache_dir", str(sd_cache)]
    assert main(["distill", *args]) == 2
    err = capsys.readouterr().err
    assert "--resolution 32" in err and "re-run `fewstep cache`" in err
    assert main(["distill", "--pretrained_teacher_model", str(tiny_teacher), "--cache_dir", str(tmp_path)]) == 2
    assert "not a fewstep cache" in capsys.readouterr().err


def test_sdxl_cache_keeps_micro_conditioning(tiny_sdxl, caption_folder, tmp_path):
    out = tmp_path / "c"
    assert _cache(tiny_sdxl, caption_folder, out, "--center_crop", "false") == 0
    from fewstep.data.cache import CachedDataset
    from fewstep.models.bundle import load_bundle

    ds = CachedDataset(str(out))
    assert set(k for k in ds[0] if k.startswith("cached_text.")) == {"cached_text.encoder_hidden_states",
                                                                     "cached_text.text_embeds"}
    assert ds[0]["original_size"].tolist() == [40, 40]
    bundle = load_bundle(str(tiny_sdxl))
    text = bundle.embed_text([ds[0]["caption"]])
    assert torch.allclose(text["text_embeds"][0], ds[0]["cached_text.text_embeds"], atol=1e-6)
