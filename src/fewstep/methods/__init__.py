"""Distillation methods. Importing this package registers every method."""

from . import direct, disback, dmd2, lcm, teacher  # noqa: F401
from .base import REGISTRY, Group, Method, StepOutput, register

__all__ = ["REGISTRY", "Group", "Method", "StepOutput", "register"]
