"""Loaded at start-up by every Python process that has this directory on PYTHONPATH: the federation a
mutation test of `fedtune audit` starts, its Ray workers included. With FEDTUNE_TEST_MUTATION set, it
breaks DP-SGD in Opacus on purpose, while fedtune's accounting and ledger still claim the configured
noise, so that the audit has a real privacy bug to catch. Tests only; nothing in fedtune reads it.

- `noise-off`: the Gaussian noise DP-SGD adds to each summed, clipped gradient is zero.
- `noise-tenth`: that noise has a tenth of its standard deviation.
- `clip-off`: per-sample gradients are summed unclipped; the noise is still scaled to the clipping
  norm C, as if they had been clipped.
- `noise-seeded-like-sampling`: the noise's generator is seeded like the Poisson sampling's, so both
  draw the same stream of random numbers (the defect issue #18 fixed).
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

if _MUTATION == "clip-off":
    from opacus.optimizers.optimizer import DPOptimizer as _DPOptimizer

    _clip_and_accumulate = _DPOptimizer.clip_and_accumulate

    def _unclipped(self):
        # An infinite norm makes every clip factor min(inf / norm, 1) = 1; restored before the noise,
        # whose std is noise_multiplier * max_grad_norm.
        saved, self.max_grad_norm = self.max_grad_norm, float("inf")
        try:
            _clip_and_accumulate(self)
        finally:
            self.max_grad_norm = saved

    _DPOptimizer.clip_and_accumulate = _unclipped

if _MUTATION == "noise-seeded-like-sampling":
    from fedtune.privacy.dpsgd import RoundSeeds as _RoundSeeds

    _generator = _RoundSeeds.generator

    def _like_sampling(self, stream, device="cpu"):
        return _generator(self, "sampling" if stream == "noise" else stream, device)

    _RoundSeeds.generator = _like_sampling
