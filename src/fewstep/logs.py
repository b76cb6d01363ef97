"""What fewstep's commands let through from the libraries under them: one line per event of fewstep's
own, not accelerate's eight INFO lines per checkpoint or diffusers' notes about scheduler configs."""

from __future__ import annotations

import logging


class _DropForeignSchedulerKeys(logging.Filter):
    """diffusers warns when a scheduler is built from another scheduler's config (a DDIM teacher sampled
    with DPM-Solver++ or LCM, a DDPM config given to DDIM) about the keys the new class does not take
    (``variance_type``, ``clip_sample``, ...). fewstep does that on purpose; the keys are irrelevant."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not ("were passed to" in msg and "are not expected and will be ignored" in msg)


def quiet_libraries() -> None:
    """Idempotent: accelerate to warnings only; diffusers' foreign-scheduler-key warnings dropped."""
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    logger = logging.getLogger("diffusers.configuration_utils")
    if not any(isinstance(f, _DropForeignSchedulerKeys) for f in logger.filters):
        logger.addFilter(_DropForeignSchedulerKeys())
