"""`fewstep train-teacher`: the VAE phase then the UNet phase through the one trainer; the result is a
pipeline vanilla diffusers loads."""

import torch

from fewstep.cli import main, parse_run
from fewstep.training.trainer import Trainer


def teacher_args(data, out, **kw):
    base = dict(teacher_preset="tiny", train_data_dir=data, output_dir=out, resolution=32, center_crop=True,
                train_batch_size=4, max_train_steps=4, vae_train_steps=2, learning_rate=1e-3, lr_warmup_steps=0,
                validation_steps=0, checkpointing_steps=100, report_to="none", teacher_ema_decay=0.5)
    base.update(kw)
    return [x for k, v in base.items() for x in (f"--{k}", str(v))]


def test_phases_switch_and_each_updates_only_its_network(caption_folder, tmp_path):
    tr = Trainer(parse_run(["--method", "teacher", *teacher_args(caption_folder, tmp_path / "o")]))
    tr.start()
    m = tr.method
    unet0 = {k: v.clone() for k, v in m.bundle.denoiser.state_dict().items()}
    vae0 = {k: v.clone() for k, v in m.bundle.vae.state_dict().items()}
    logs = tr.step()
    assert "vae/recon_mse" in logs and float(m.scale.value) == 0
    assert all(torch.equal(v, m.bundle.denoiser.state_dict()[k]) for k, v in unet0.items())  # UNet untouched
    assert not all(torch.equal(v, m.bundle.vae.state_dict()[k]) for k, v in vae0.items())
    tr.step()
    vae1 = {k: v.clone() for k, v in m.bundle.vae.state_dict().items()}
    ema0 = {k: v.clone() for k, v in m.ema.state_dict().items()}
    logs = tr.step()  # first UNet step: the latent scale is measured, the VAE is frozen
    assert "vae/recon_mse" not in logs and float(m.scale.value) > 0
    assert all(torch.equal(v, m.bundle.vae.state_dict()[k]) for k, v in vae1.items())
    assert not all(torch.equal(v, m.bundle.denoiser.state_dict()[k]) for k, v in unet0.items())
    for k, v in m.ema.state_dict().items():  # EMA with decay 0.5 sits halfway
        assert torch.allclose(v, 0.5 * ema0[k] + 0.5 * m.bundle.denoiser.state_dict()[k], atol=1e-6)


def test_trained_teacher_loads_in_vanilla_diffusers(caption_folder, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    out = tmp_path / "teacher"
    assert main(["train-teacher", *teacher_args(caption_folder, out, checkpointing_steps=2)]) == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    assert isinstance(pipe.scheduler, DDIMScheduler) and pipe.vae.config.scaling_factor > 0
    img = pipe("a handwritten digit four", num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
               output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert img.shape == (32, 32, 3) and img.std() > 0
    # …and it is a teacher LCD can start from.
    rc = main(["distill", "--pretrained_teacher_model", str(out), "--train_data_dir", str(caption_folder),
               "--output_dir", str(tmp_path / "student"), "--resolution", "32", "--train_batch_size", "2",
               "--max_train_steps", "1", "--report_to", "none", "--validation_steps", "0"])
    assert rc == 0 and (tmp_path / "student" / "unet" / "config.json").is_file()
