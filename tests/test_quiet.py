"""Library chatter that says nothing to a fedtune user is dropped, and only that (fedtune/quiet.py)."""

from __future__ import annotations

import logging

from flwr.supercore import log

from fedtune.quiet import quiet_libraries


def test_flowers_actor_shutdown_notice_is_dropped_and_its_other_warnings_still_show(caplog):
    """Flower's Simulation Engine logs a WARNING "Manually terminating ClientAppActor" from every worker
    at the end of each run, the clean ones too (twice each, through Ray's log forwarding)."""
    quiet_libraries()
    quiet_libraries()  # called in every process, maybe more than once: one filter
    with caplog.at_level(logging.WARNING):
        log(logging.WARNING, "Manually terminating %s", "ClientAppActor")
        log(logging.WARNING, "Something else %s", "happened")
    assert [r.getMessage() for r in caplog.records] == ["Something else happened"]
    assert sum(type(f).__name__ == "_DropActorShutdown" for f in logging.getLogger("flwr").filters) == 1
