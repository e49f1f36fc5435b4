"""How client metrics combine: losses and accuracies by example-weighted mean, ε by maximum.

Flower's default averages every metric; a mean ε would understate the worst client's loss
of privacy, so ε takes the maximum, as does peak memory. Bytes sent are a plain mean over the
clients that sent an update: a client's payload does not grow with its data, and a declined
client's 0 is no payload.
"""

from __future__ import annotations

from flwr.app import MetricRecord, RecordDict

from fedtune import constants as k

MAX_KEYS = {k.EPSILON, k.EPSILON_OTHER, k.PEAK_RSS_MB}
SENDER_MEAN_KEYS = {k.BYTES_UP}
PER_REPLY_KEYS = {k.PID}  # read from each reply by the server (peak memory per process); no aggregate


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    rows = [next(iter(r.metric_records.values())) for r in records]
    weights = [float(row[weight_key]) for row in rows]
    total = sum(weights)
    out = MetricRecord({weight_key: int(total)})
    for key in rows[0].keys():
        if key == weight_key or key in PER_REPLY_KEYS:
            continue
        values = [float(row[key]) for row in rows]
        if key in MAX_KEYS:
            out[key] = max(values)
        elif key in SENDER_MEAN_KEYS:
            sent = [v for v in values if v > 0]
            out[key] = sum(sent) / len(sent) if sent else 0.0
        elif total > 0:  # a reply of weight 0 (a client with no validation records: NaN scores) adds nothing
            out[key] = sum(w * v for w, v in zip(weights, values, strict=True) if w > 0) / total
        else:
            out[key] = sum(values) / len(values)
    return out
