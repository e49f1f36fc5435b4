"""How client metrics combine: losses and accuracies by example-weighted mean, ε by maximum.

Flower's default averages every metric; a mean ε would understate the worst client's loss
of privacy, so ε takes the maximum. Byte counts are averaged per client.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from fedtune import constants as k

MAX_KEYS = {k.EPSILON, k.EPSILON_OTHER}


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    rows = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(row[weight_key]) for row in rows]
    total = sum(weights)
    out = MetricRecord({weight_key: int(total)})
    for key in rows[0].keys():
        if key == weight_key:
            continue
        values = [float(row[key]) for row in rows]
        if key in MAX_KEYS:
            out[key] = max(values)
        elif total > 0:
            out[key] = sum(w * v for w, v in zip(weights, values, strict=True)) / total
        else:
            out[key] = sum(values) / len(values)
    return out
