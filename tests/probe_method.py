"""A test-only method whose loss is deterministic per sample (no noise draws), so that a run on N
processes at the same global batch must equal a run on one process up to float summation order.

Run as a script (`accelerate launch ... tests/probe_method.py distill --method probe ...`) it registers
itself and calls fewstep's command line; the tests import it and register it for in-process runs.
Its export writes the weights and, per step, the global-batch loss and the captions of the global
batch (gathered from every rank), which is what the multi-process test compares."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from fewstep.methods.base import Group, Method, StepOutput


@dataclass
class ProbeConfig:
    probe_channels: int = 4  # hidden channels of the probe's two-layer conv net


class Probe(Method):
    name = "probe"
    Config = ProbeConfig
    needs_teacher = False

    @classmethod
    def make_bundle(cls, cfg, mcfg):
        return None

    def __init__(self, cfg, mcfg, bundle, accelerator):
        super().__init__(cfg, mcfg, bundle, accelerator)
        g = torch.Generator().manual_seed(1234)  # the same start on every rank and in every run
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, mcfg.probe_channels, 3, padding=1), torch.nn.SiLU(),
                                       torch.nn.Conv2d(mcfg.probe_channels, 3, 3, padding=1))
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.history: list[dict] = []

    def groups(self):
        return {"net": Group(self.net)}

    def loss(self, phase, batch, step):
        from accelerate.utils import gather_object

        x = batch["pixel_values"].to(self.accelerator.device)
        loss = ((self.net(x) - x.flip(-1)) ** 2).mean()  # learn a horizontal mirror: a per-sample loss
        # Every rank's batch has the same size, so the mean of the rank means is the global-batch mean.
        global_loss = self.accelerator.reduce(loss.detach().clone(), reduction="mean")
        captions = gather_object(list(batch["caption"])) if self.accelerator.num_processes > 1 else batch["caption"]
        self.history.append({"step": step, "loss": float(global_loss), "captions": sorted(captions)})
        return StepOutput(loss, {"loss": loss.detach()})

    def sample(self, prompts, seeds, num_inference_steps, guidance_scale):
        raise NotImplementedError("the probe makes no images")

    def export(self, out_dir: Path):
        from safetensors.torch import save_file

        net = self.accelerator.unwrap_model(self.net)
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(Path(out_dir) / "probe.safetensors"))
        (Path(out_dir) / "probe_history.json").write_text(json.dumps(self.history))
        return {"scheduler": "none"}


if __name__ == "__main__":
    from fewstep.cli import main
    from fewstep.methods import REGISTRY

    REGISTRY["probe"] = Probe
    sys.exit(main(sys.argv[1:]))
