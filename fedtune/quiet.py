"""Silence library chatter that says nothing to a fedtune user (called in every process).

Each filter names one known, benign message; everything else still shows.
"""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialized" load report is expected
    hf_logging.disable_progress_bar()
    quiet_warnings()
    flower = logging.getLogger("flwr")
    if not any(isinstance(f, _DropActorShutdown) for f in flower.filters):
        flower.addFilter(_DropActorShutdown())


class _DropActorShutdown(logging.Filter):
    # Flower's Simulation Engine ends each client worker with a WARNING "Manually terminating
    # ClientAppActor" (twice, through Ray's log forwarding) after every run, the clean ones too.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Manually terminating")


def quiet_warnings() -> None:
    """The warning filters alone, without importing transformers: for commands that only account."""
    for message in (
        r"Secure RNG turned off",  # Opacus: we seed noise for reproducible research runs
        r"Full backward hook is firing",  # Opacus hooks on a frozen embedding input
        r".*is_gradient_checkpointing.*",
        r"Tip: In future versions of Ray",
        r"Optimal order is the (largest|smallest) alpha",  # RDP accountant, harmless at our ranges
    ):
        warnings.filterwarnings("ignore", message=message)
    # PRV accountant: log(0) inside np.where for masked-out entries; the result is finite.
    warnings.filterwarnings("ignore", message="divide by zero encountered in log", category=RuntimeWarning)
