"""Which LoRA rank a client trains, and the global adapter as a lower-rank client holds it."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, RecordDict

from fedtune import constants as k
from fedtune.client.app import _model, own_rank
from fedtune.config import FedtuneConfig
from fedtune.data.demo import LABELS
from fedtune.errors import ConfigError
from fedtune.models.adapter import to_record
from fedtune.models.build import build_model

MIXED = FedtuneConfig(clients=4).with_overrides({"lora.r": 4, "lora.client_ranks": "2,4"})


def context(**node_config) -> Context:
    return Context(run_id=1, node_id=2, node_config=node_config, state=RecordDict(), run_config={})


def test_simulated_client_i_trains_the_rank_at_i_modulo_the_list():
    assert [own_rank(MIXED, context(**{k.PARTITION_ID: i})) for i in range(5)] == [2, 4, 2, 4, 2]
    assert own_rank(FedtuneConfig(), context(**{k.PARTITION_ID: 3})) == 4  # one rank: lora.r


def test_a_nodes_own_rank_overrides_the_list():
    assert own_rank(MIXED, context(**{k.PARTITION_ID: 1, k.NODE_LORA_RANK: 3})) == 3
    assert own_rank(MIXED, context(**{k.NODE_LORA_RANK: 1})) == 1  # deployment: no partition id


@pytest.mark.parametrize("cfg, value, says", [
    (MIXED, 8, "from 1 to lora.r = 4"),
    (MIXED, "2", "from 1 to lora.r = 4"),
    (FedtuneConfig(), 2, "lora.client_ranks"),  # the run has one rank: the server would refuse rank 2
])
def test_an_unusable_node_rank_is_refused_with_the_fix(cfg, value, says):
    with pytest.raises(ConfigError, match=f"`{k.NODE_LORA_RANK}`.*{says}"):
        own_rank(cfg, context(**{k.NODE_LORA_RANK: value}))


def test_a_rank2_client_holds_the_first_two_components_of_the_rank4_global_update():
    glob = build_model(MIXED.model, MIXED.lora, num_labels=len(LABELS), seed=MIXED.seed)
    rng = np.random.default_rng(0)
    state = {name: a.numpy() for name, a in to_record(glob).items()}
    state = {name: rng.normal(size=v.shape).astype(np.float32) if "lora_B" in name else v for name, v in state.items()}
    record = ArrayRecord({name: Array(v) for name, v in state.items()})
    model = _model(MIXED, record, context(**{k.PARTITION_ID: 0}))  # partition 0: rank 2
    scale = MIXED.lora.alpha / 4  # the global adapter's
    checked = 0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            prefix = f"{name}.lora_{{}}.default.weight"
            b, a = state[prefix.format("B")], state[prefix.format("A")]
            assert module.lora_A["default"].weight.shape == (2, a.shape[1])
            np.testing.assert_allclose(module.get_delta_weight("default").detach().numpy(),
                                       scale * b[:, :2] @ a[:2], rtol=1e-5, atol=1e-7)
            checked += 1
    assert checked == 12  # query and value in 6 layers
    assert all(v.shape[0] == 2 for n, v in to_record(model).items() if "lora_A" in n)  # it replies at rank 2
