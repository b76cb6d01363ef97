"""fewstep: distil diffusers-format diffusion models into few-step generators."""

__version__ = "0.1.0"
