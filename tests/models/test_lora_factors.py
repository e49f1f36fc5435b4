"""FFA-LoRA: A is the seed's shared value, frozen and never sent; DP-SGD trains and noises B only;
averaging B is then averaging the updates B·A."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch.utils.data import TensorDataset, default_collate

from fedtune import constants as k
from fedtune.config import DPConfig, FedtuneConfig, LoraConfig, ModelConfig
from fedtune.data.demo import LABELS
from fedtune.models.adapter import to_record
from fedtune.models.build import build_model
from fedtune.models.lora_factors import freeze_shared_a
from fedtune.privacy.dpsgd import RoundSeeds, make_private
from fedtune.strategies.build import build_strategy


def ffa_model(r: int, seed: int = 0):
    return build_model.__wrapped__(ModelConfig(), LoraConfig(r=r, aggregation="ffa"), num_labels=len(LABELS),
                                   seed=seed)


def a_factors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}


def test_a_is_frozen_shared_through_the_seed_and_nested_across_ranks():
    four, two, other_seed = a_factors(ffa_model(4)), a_factors(ffa_model(2)), a_factors(ffa_model(4, seed=1))
    assert len(four) == 12
    for name, a in four.items():
        torch.testing.assert_close(two[name], a[:2], rtol=0, atol=0)  # a rank-2 client holds the first rows
        assert not torch.equal(other_seed[name], a)
        bound = 1 / math.sqrt(a.shape[1])  # PEFT's default init range, U(-1/sqrt(in), 1/sqrt(in))
        assert a.abs().max() <= bound and a.abs().max() > 0.9 * bound
    model = ffa_model(4)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
    payload = to_record(model)
    assert not any("lora_A" in n for n in payload.keys()) and any("lora_B" in n for n in payload.keys())


def test_the_shared_a_does_not_depend_on_the_global_rng():
    def toy():
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 2)),
                               PeftLoraConfig(r=3, target_modules=["0"]))
        freeze_shared_a(model, seed=5)
        return a_factors(model)

    torch.manual_seed(1)
    first = toy()
    torch.manual_seed(2)
    torch.testing.assert_close(toy(), first, rtol=0, atol=0)


def test_dp_sgd_trains_and_noises_b_only_and_leaves_a_unchanged():
    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2)),
                           PeftLoraConfig(r=2, target_modules=["0"]))
    freeze_shared_a(model, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" in n}
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 1  # lora_B only
    x, y = torch.randn(32, 6), torch.randint(0, 2, (32,))
    private = make_private(model, torch.optim.SGD(params, lr=0.1), TensorDataset(x, y), 16, default_collate,
                           DPConfig(noise_multiplier=1.0, max_grad_norm=1.0), [], RoundSeeds.derived(0))
    try:
        assert [p for group in private.optimizer.param_groups for p in group["params"]] == params
        for batch in private.loader:
            if batch is not None:  # an empty Poisson draw
                xb, yb = batch
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                private.optimizer.step()
                private.optimizer.zero_grad(set_to_none=True)
    finally:
        private.close()
    after = dict(model.named_parameters())
    for name, value in before.items():
        changed = not torch.equal(after[name].detach(), value)
        assert changed == ("lora_B" in name), name


def test_averaging_b_under_the_shared_a_is_averaging_the_updates():
    strategy = build_strategy(FedtuneConfig().with_overrides({"lora.aggregation": "ffa"}))
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 5)).astype(np.float32)  # shared, never in a payload
    b1, b2 = rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=(4, 2)).astype(np.float32)

    class Reply:  # what aggregate_train reads from a Flower reply
        def __init__(self, b, n):
            self.content = RecordDict({k.ARRAYS: ArrayRecord({"m.lora_B.default.weight": Array(b)}),
                                       k.METRICS: MetricRecord({k.NUM_EXAMPLES: n})})

        def has_error(self):
            return False

    arrays, _ = strategy.aggregate_train(1, [Reply(b1, 10), Reply(b2, 30)])
    mean_b = arrays["m.lora_B.default.weight"].numpy()
    np.testing.assert_allclose(mean_b, 0.25 * b1 + 0.75 * b2, rtol=1e-6)
    np.testing.assert_allclose(mean_b @ a, 0.25 * b1 @ a + 0.75 * b2 @ a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("aggregation", ["naive", "exact"])
def test_other_aggregations_train_and_send_a(aggregation):
    model = build_model.__wrapped__(ModelConfig(), LoraConfig(r=2, aggregation=aggregation), num_labels=len(LABELS))
    assert all(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)
