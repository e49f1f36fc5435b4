"""Loaded at start-up by every Python process that has this directory on PYTHONPATH: the federation a
mutation test of `fedtune audit` starts, its Ray workers included. With FEDTUNE_TEST_MUTATION set, it
breaks DP-SGD in Opacus on purpose, while fedtune's accounting and ledger still claim the configured
noise, so that the audit has a real privacy bug to catch. Tests only; nothing in fedtune reads it.

- `noise-off`: the Gaussian noise DP-SGD adds to each summed, clipped gradient is zero.
- `noise-tenth`: that noise has a tenth of its standard deviation.
"""

import os

_MUTATION = os.environ.get("FEDTUNE_TEST_MUTATION")

if _MUTATION in ("noise-off", "noise-tenth"):
    import opacus.optimizers.optimizer as _optimizer

    _generate_noise = _optimizer._generate_noise
    _scale = 0.0 if _MUTATION == "noise-off" else 0.1

    def _mutated_noise(std, reference, generator=None, secure_mode=False):
        return _generate_noise(std * _scale, reference, generator, secure_mode)

    _optimizer._generate_noise = _mutated_noise
