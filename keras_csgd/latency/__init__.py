"""Latency-targeted pruning: measure the runtime, plan to a target, verify.

`profile(model, runtime, batch_size)` measures a `LatencyTable` on this
machine (cached); `plan_for_latency(model, target)` plans to a fraction of
the full model's latency and verifies it by timing (`LatencyReport`).
"""

from keras_csgd.latency.profile import profile
from keras_csgd.latency.table import LatencyTable
from keras_csgd.latency.target import (
    LatencyReport,
    kept_importance,
    plan_for_latency,
    time_against_full,
)
from keras_csgd.latency.timing import RUNTIMES, machine

__all__ = [
    "RUNTIMES", "LatencyReport", "LatencyTable", "kept_importance",
    "machine", "plan_for_latency", "profile", "time_against_full",
]
