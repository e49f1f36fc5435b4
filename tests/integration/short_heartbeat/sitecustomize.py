"""Loaded at start-up by a Python process that has this directory on PYTHONPATH: the SuperNode that
test_deployment kills (and the processes it starts). It sends Flower's heartbeat at the shortest
interval the SuperLink accepts (10 s instead of 30 s), so the SuperLink declares it gone about 20 s
after the kill instead of up to 60 s. Nothing else changes: the round still has to notice the dead
node through the SuperLink, the way it would in a real deployment, only sooner."""

import flwr.common.constant as _constant

_constant.HEARTBEAT_DEFAULT_INTERVAL = _constant.HEARTBEAT_MIN_INTERVAL
