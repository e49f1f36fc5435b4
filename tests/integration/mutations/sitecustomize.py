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

Every patch is applied when its target module is first imported, never at start-up: importing torch
or the server's round loop in every process Ray starts (its dashboard and agents too) slows Ray's start
past its own timeout on a busy machine, and the run then ends before it writes anything.
"""

import importlib.abc
import os
import sys

_MUTATION = os.environ.get("FEDTUNE_TEST_MUTATION")


def _patch_on_import(module_name, patch):
    """Call patch(module) right after module_name is executed, in whichever process imports it."""

    class _PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != module_name:
                return None
            sys.meta_path.remove(self)  # the other finders locate the module as they always would
            spec = next(filter(None, (f.find_spec(name, path, target) for f in sys.meta_path
                                      if hasattr(f, "find_spec"))), None)
            if spec is None or spec.loader is None:
                return spec
            run_module = spec.loader.exec_module

            def exec_module(module):
                run_module(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _PatchOnImport())


def _scale_noise(optimizer_module, scale):
    generate_noise = optimizer_module._generate_noise

    def mutated_noise(std, reference, generator=None, secure_mode=False):
        return generate_noise(std * scale, reference, generator, secure_mode)

    optimizer_module._generate_noise = mutated_noise


def _sum_unclipped(optimizer_module):
    clip_and_accumulate = optimizer_module.DPOptimizer.clip_and_accumulate

    def unclipped(self):
        # An infinite norm makes every clip factor min(inf / norm, 1) = 1; restored before the noise,
        # whose std is noise_multiplier * max_grad_norm.
        saved, self.max_grad_norm = self.max_grad_norm, float("inf")
        try:
            clip_and_accumulate(self)
        finally:
            self.max_grad_norm = saved

    optimizer_module.DPOptimizer.clip_and_accumulate = unclipped


def _seed_noise_like_sampling(dpsgd_module):
    generator = dpsgd_module.RoundSeeds.generator

    def like_sampling(self, stream, device="cpu"):
        return generator(self, "sampling" if stream == "noise" else stream, device)

    dpsgd_module.RoundSeeds.generator = like_sampling


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


if _MUTATION in ("noise-off", "noise-tenth"):
    _patch_on_import("opacus.optimizers.optimizer",
                     lambda m: _scale_noise(m, 0.0 if _MUTATION == "noise-off" else 0.1))
elif _MUTATION == "clip-off":
    _patch_on_import("opacus.optimizers.optimizer", _sum_unclipped)
elif _MUTATION == "noise-seeded-like-sampling":
    _patch_on_import("fedtune.privacy.dpsgd", _seed_noise_like_sampling)
elif _MUTATION == "last-reply-lost":
    _patch_on_import("fedtune.server.rounds", _lose_last_reply)
