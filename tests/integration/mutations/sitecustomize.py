"""Loaded at start-up by every Python process that has this directory on PYTHONPATH: the federation a
mutation test of `fedtune audit` starts, its Ray workers included. With FEDTUNE_TEST_MUTATION set, it
breaks DP-SGD in Opacus on purpose, while fedtune's accounting and ledger still claim the configured
noise, so that the audit has a real privacy bug to catch; or, for the ledger's tests, it makes a
network fault happen. Tests only; nothing in fedtune reads it.

- `noise-off`: the Gaussian noise DP-SGD adds to each summed, clipped gradient is zero.
- `noise-tenth`: that noise has a tenth of its standard deviation.
- `clip-off`: per-sample gradients are summed unclipped; the noise is still scaled to the clipping
  norm C, as if they had been clipped.
- `noise-seeded-like-sampling`: the noise's generator is seeded like the Poisson sampling's, so both
  draw the same stream of random numbers (the defect issue #18 fixed).
- `last-reply-lost` (a fault, not a defect): in the run's last round the server never gets the train
  reply of the lowest-numbered node that answered, as if it came after round_timeout_s, though that
  client trained and spent.
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

if _MUTATION == "last-reply-lost":
    # Patched when the server's round loop is imported, not here: importing it in every process Ray
    # starts (its agents too) slows Ray's start past its own timeout on a busy machine.
    import importlib.abc
    import importlib.machinery
    import sys

    def _lose_last_reply(rounds):
        send_train = rounds.Transport.train

        def last_reply_lost(self, messages, label):
            replies = send_train(self, messages, label)
            this_round, last = label.split()[1].split("/")  # "round R/N train"
            answered = [r for r in replies if not r.has_error()]
            if this_round != last or not answered:
                return replies
            lost = min(answered, key=lambda r: r.metadata.src_node_id)
            sent = next(m for m in messages if m.metadata.dst_node_id == lost.metadata.src_node_id)
            return [rounds.failed_reply(sent, rounds.NO_REPLY) if r is lost else r for r in replies]

        rounds.Transport.train = last_reply_lost

    class _PatchRoundsOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "fedtune.server.rounds":
                return None
            sys.meta_path.remove(self)
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                _lose_last_reply(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchRoundsOnImport())
