"""DMD2's regression term and stage (issue 15 item 6): the target is the teacher's saved latents, else
the VAE posterior mean (never a posterior sample); LPIPS from local weights against an independent
formula; the regression-only stage trains G alone and the next run starts from it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import run_args
from fewstep.cli import main, parse_run
from fewstep.config import ConfigError
from fewstep.training.trainer import Trainer

PROMPTS = ["a handwritten digit one", "a handwritten digit seven"]


@pytest.fixture(scope="module")
def pairs(tiny_teacher, tmp_path_factory):
    """Teacher noise → image pairs with saved latents, as `fewstep generate --save_latents` writes them."""
    from fewstep.generate import generate

    out = tmp_path_factory.mktemp("pairs") / "data"
    generate(str(tiny_teacher), str(out), PROMPTS, teacher_steps=4, teacher_guidance_scale=2.0, student_steps=1,
             student_guidance_scale=1.0, images_per_prompt=2, seed=3, save_latents=True, batch_size=4, progress=False)
    return out / "metadata.csv"


def _trainer(teacher, data, out, **kw):
    args = dict(method="dmd2", dfake_gen_update_ratio=1, real_guidance_scale=2.0, caption_column="prompt",
                regression_loss_weight=1.0, dm_loss_weight=0.0)
    args.update(kw)
    return Trainer(parse_run(run_args(teacher, data, out, **args)))


def _g_x0(tr, batch):
    """G's x̂₀ at t = 999 from each row's regenerated noise, computed from diffusers' pieces."""
    b, gen = tr.bundle, tr.acc.unwrap_model(tr.method.generator)
    noise = torch.cat([torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(int(s)))
                       for s in batch["meta"]["seed"]])
    text = b.encode_text(list(batch["caption"]))["encoder_hidden_states"]
    eps = gen(noise, torch.tensor([999] * len(noise)), encoder_hidden_states=text).sample
    ac = b.schedule.alphas_cumprod[999].float()
    return (noise - (1 - ac).sqrt() * eps) / ac.sqrt()


def test_the_target_is_the_saved_latents(tiny_teacher, pairs, tmp_path):
    from safetensors.torch import load_file

    tr = _trainer(tiny_teacher, pairs, tmp_path / "o")
    tr.start()
    batch = tr._next_batch()
    assert all(batch["meta"]["latents"])
    got = tr.method.loss("generator", batch, 0).logs["loss_regression"].item()
    saved = torch.stack([load_file(str(pairs.parent / p))["latents"] for p in batch["meta"]["latents"]])
    with torch.no_grad():
        ref = torch.mean((_g_x0(tr, batch) - saved) ** 2).item()
    assert got == pytest.approx(ref, rel=1e-5)


def test_without_saved_latents_the_target_is_the_posterior_mean(tiny_teacher, pairs, tmp_path):
    """Rows without a latents column: the VAE posterior mean of the image, the same on every draw."""
    import csv

    rows = list(csv.DictReader(open(pairs)))
    meta = pairs.parent / "no_latents.csv"
    with open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "prompt", "seed", "rand_device"])
        w.writeheader()
        w.writerows([{k: r[k] for k in ("image", "prompt", "seed", "rand_device")} for r in rows])
    tr = _trainer(tiny_teacher, meta, tmp_path / "o")
    tr.start()
    batch = tr._next_batch()
    got = []
    for seed in (1, 2):  # other RNG states would draw other posterior samples
        torch.manual_seed(seed)
        got.append(tr.method.loss("generator", batch, 0).logs["loss_regression"].item())
    b = tr.bundle
    with torch.no_grad():
        mean = b.vae.encode(batch["pixel_values"]).latent_dist.mean * b.vae.config.scaling_factor
        ref = torch.mean((_g_x0(tr, batch) - mean) ** 2).item()
    assert got[0] == got[1] == pytest.approx(ref, rel=1e-5)


def tiny_lpips_state(channels=(4, 6, 8), seed=0) -> dict:
    """A state dict in lpips.LPIPS(net='vgg')'s layout (scaling layer, VGG slices indexed as torchvision's
    features, lin layers) with tiny random weights: slice 1 = convs 0, 2; slice 2 = pool 4, convs 5, 7;
    slice 3 = pool 9, conv 10."""
    g = torch.Generator().manual_seed(seed)
    c1, c2, c3 = channels
    convs = {1: {0: (3, c1), 2: (c1, c1)}, 2: {5: (c1, c2), 7: (c2, c2)}, 3: {10: (c2, c3)}}
    sd = {"scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
          "scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)}
    for s, layers in convs.items():
        for i, (cin, cout) in layers.items():
            sd[f"net.slice{s}.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.3
            sd[f"net.slice{s}.{i}.bias"] = torch.randn(cout, generator=g) * 0.1
        cout = list(layers.values())[-1][1]
        sd[f"lin{s - 1}.model.1.weight"] = torch.rand(1, cout, 1, 1, generator=g)
    return sd


def lpips_reference(sd, x, y) -> torch.Tensor:
    """LPIPS written out: scale, run each slice (conv+ReLU, max-pool where the layout skips an index),
    unit-normalise over channels, weight the squared difference per channel, average over space, sum."""
    shift, scale = sd["scaling_layer.shift"], sd["scaling_layer.scale"]

    def features(img):
        h = (img - shift) / scale
        outs = []
        for convs in ([0, 2], [5, 7], [10]):
            s = {0: 1, 5: 2, 10: 3}[convs[0]]
            if convs[0] != 0:
                h = F.max_pool2d(h, 2)
            for i in convs:
                h = F.relu(F.conv2d(h, sd[f"net.slice{s}.{i}.weight"], sd[f"net.slice{s}.{i}.bias"], padding=1))
            outs.append(h)
        return outs

    total = torch.zeros(x.shape[0])
    for k, (a, b) in enumerate(zip(features(x), features(y))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = sd[f"lin{k}.model.1.weight"].view(1, -1, 1, 1)
        total = total + (w * (a - b) ** 2).sum(1).mean(dim=(1, 2))
    return total


def test_lpips_equals_the_formula_and_reads_pth_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    from fewstep.eval.lpips import LPIPS

    sd = tiny_lpips_state()
    torch.save(sd, tmp_path / "lpips.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "lpips.safetensors"))
    x, y = torch.rand(3, 3, 16, 16) * 2 - 1, torch.rand(3, 3, 16, 16) * 2 - 1
    ref = lpips_reference(sd, x, y)
    for name in ("lpips.pth", "lpips.safetensors"):
        d = LPIPS.from_file(tmp_path / name)
        assert torch.allclose(d(x, y), ref, rtol=1e-5, atol=1e-7)
        assert torch.allclose(d(x, x), torch.zeros(3))
    xg = x.clone().requires_grad_(True)
    LPIPS(sd)(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0  # a loss: gradients reach the image
    bad = {k: v for k, v in sd.items() if not k.startswith("lin2")}
    with pytest.raises(ConfigError, match="not the state dict of lpips.LPIPS"):
        LPIPS(bad)
    alex = dict(sd, **{"net.slice1.0.weight": torch.zeros(4, 3, 11, 11)})
    with pytest.raises(ConfigError, match="only the VGG variant"):
        LPIPS(alex)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        LPIPS.from_file(tmp_path / "junk.pth")


def test_regression_only_stage_then_dmd2_from_it(tiny_teacher, pairs, tmp_path):
    """Stage 1 (DMD2's ODE pretraining): only G, only LPIPS of its decoded one-step output against the
    teacher's image, no fake score built; stage 2 starts G from stage 1's export."""
    from safetensors.torch import load_file

    lp = tmp_path / "lpips.pth"
    sd = tiny_lpips_state()
    torch.save(sd, lp)
    stage1 = tmp_path / "ode"
    tr = _trainer(tiny_teacher, pairs, stage1, regression_only=True, regression_loss="lpips", lpips_weights=lp,
                  learning_rate=1e-3, max_train_steps=2)
    tr.start()
    assert list(tr.method.groups()) == ["generator"] and tr.method.guidance is None
    assert [tr.method.phase(s) for s in range(3)] == ["generator"] * 3
    batch = tr._next_batch()
    logs = tr.method.loss("generator", batch, 0).logs
    assert set(logs) == {"loss_regression", "loss"}
    b = tr.bundle
    with torch.no_grad():
        sf = b.vae.config.scaling_factor
        image = b.vae.decode(_g_x0(tr, batch) / sf).sample  # G's output, decoded
        saved = torch.stack([load_file(str(pairs.parent / p))["latents"] for p in batch["meta"]["latents"]])
        teacher = b.vae.decode(saved / sf).sample
    assert logs["loss_regression"].item() == pytest.approx(lpips_reference(sd, image, teacher).mean().item(),
                                                           rel=1e-4)
    args = run_args(tiny_teacher, pairs, stage1, method="dmd2", caption_column="prompt", regression_only=True,
                    regression_loss_weight=1.0, regression_loss="lpips", lpips_weights=lp, learning_rate=1e-3,
                    max_train_steps=2)
    assert main(["distill", *args]) == 0
    exported = load_file(str(stage1 / "unet" / "diffusion_pytorch_model.safetensors"))

    # Stage 2: DMD2 (fake score and all) from stage 1's generator.
    tr2 = Trainer(parse_run(run_args(tiny_teacher, pairs, tmp_path / "dmd2", method="dmd2", caption_column="prompt",
                                     dfake_gen_update_ratio=1, generator_ckpt_path=stage1)))
    gen = tr2.method.generator.state_dict()
    assert all(torch.equal(gen[k], v) for k, v in exported.items())
    assert "guidance" in tr2.method.groups()
    teacher_sd = tr2.bundle.denoiser.state_dict()
    assert any(not torch.equal(teacher_sd[k].float(), v) for k, v in exported.items())  # it was trained
    tr2.start()
    assert np.isfinite(tr2.step()["loss"])


def test_regression_settings_are_checked(tiny_teacher, pairs, caption_folder, tmp_path):
    def refused(match, **kw):
        with pytest.raises(ConfigError, match=match):
            Trainer(parse_run(run_args(tiny_teacher, pairs, tmp_path / "o", method="dmd2", caption_column="prompt",
                                       **kw)))

    refused("needs --lpips_weights", regression_loss="lpips", regression_loss_weight=1)
    refused("read by --regression_loss lpips only", lpips_weights=pairs)
    refused("--lpips_weights .*no such file", regression_loss="lpips", lpips_weights=tmp_path / "none.pth")
    refused("cannot be read as a state dict", regression_loss="lpips", regression_loss_weight=1, lpips_weights=pairs)
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "other.pth")
    refused("not the state dict of lpips", regression_loss="lpips", regression_loss_weight=1,
            lpips_weights=tmp_path / "other.pth")
    refused("--regression_loss_weight > 0", regression_only=True)
    refused("trains the generator alone", regression_only=True, regression_loss_weight=1, cls_on_clean_image=True)
    with pytest.raises(ConfigError, match="regression stage: run it with --method dmd2"):
        parse_run(run_args(tiny_teacher, pairs, tmp_path / "o", method="disback", regression_only=True,
                           regression_loss_weight=1))
    refused("no unet/config.json", generator_ckpt_path=caption_folder)
