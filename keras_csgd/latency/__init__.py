"""Latency-targeted pruning: measure the runtime, plan to a target, verify.

`profile(model, runtime, batch_size)` measures a `LatencyTable` on this
machine (checked, cached); `plan_for_latency(model, target)` plans to a
fraction of the full model's latency and verifies it by timing
(`LatencyReport`). Runtimes: `RUNTIMES` (see `keras_csgd.runtimes`).
"""

from keras_csgd.latency.profile import profile
from keras_csgd.latency.report import LatencyReport, kept_importance
from keras_csgd.latency.table import LatencyTable
from keras_csgd.latency.target import plan_at_widths, plan_for_latency
from keras_csgd.latency.timing import RUNTIMES, machine
from keras_csgd.latency.verify import time_against_full

__all__ = [
    "RUNTIMES", "LatencyReport", "LatencyTable", "kept_importance",
    "machine", "plan_at_widths", "plan_for_latency", "profile",
    "time_against_full",
]
