"""An independent ε: Google's dp_accounting, not Opacus, for the same sigma, q and steps."""

import dp_accounting as dpa
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from opacus.accountants import RDPAccountant

from fedtune.privacy.accountant import History


def independent_epsilon(kind: str, history: History, delta: float) -> float:
    """Same mechanism (Poisson-subsampled Gaussian, add/remove-one), dp_accounting's code:
    PLD for PRV (both near-exact numerical methods), RDP at Opacus' orders for RDP."""
    if kind == "prv":
        accountant = PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3)
    else:
        accountant = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    for sigma, q, steps in history:
        accountant.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


def history_from_ledger(entries: list[dict]) -> list[tuple[float, float, int]]:
    """The (sigma, q, steps) runs a client's ledger entries describe (rounds it trained)."""
    return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in entries if e["steps"] > 0]
