"""ε as fedtune reports it (Opacus' accountants) agrees with Google's dp_accounting, an
independent implementation, built from the same sigma, q and steps."""

import pytest

from fedtune.privacy.accountant import epsilon
from fedtune.privacy.independent import independent_epsilon

DELTA = 1e-5

HISTORIES = {
    "3 rounds, q=0.5": [(1.0, 0.5, 2)] * 3,
    "5 rounds, q=0.1": [(1.0, 0.1, 10)] * 5,
    "one long round": [(0.8, 0.02, 50)],
    "sigma changes": [(2.0, 0.25, 4), (1.0, 0.25, 4)],
}


@pytest.mark.parametrize("kind", ["prv", "rdp"])
@pytest.mark.parametrize("history", HISTORIES.values(), ids=HISTORIES.keys())
def test_epsilon_matches_dp_accounting_within_one_percent(kind, history):
    assert epsilon(kind, history, DELTA) == pytest.approx(independent_epsilon(kind, history, DELTA), rel=0.01)
