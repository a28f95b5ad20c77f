"""Timing every variant a latency profile fits against the full model.

`measure` times each variant of `profile`'s design against the full model
(`Timer`: `timing.Pair` by the profile's schedule, `PROFILE_TIMING`, or an
injected `measure` function) and times again those that fell in a slow
phase of the machine (`timing.SLOW_PHASE`).
"""

from __future__ import annotations

import functools

import keras
import numpy as np

from keras_csgd.latency import design, timing

# Per variant: blocks of about 5 ms in as many rounds (5 to 51) as fit in
# 1 s of timing.
PROFILE_TIMING = {"block_ms": 5.0, "budget_ms": 1000.0, "rounds": (5, 51)}


class Timer:
    """Latency changes of variants relative to the full model
    (`timing.Pair`, or `measure`)."""

    def __init__(self, model, runtime, batch_size, threads, jit_compile,
                 rounds, measure, files):
        self.measure, self.pair, self.files = measure, None, files
        if measure is None:
            limits = PROFILE_TIMING["rounds"] if rounds is None else (
                rounds, rounds)
            self.pair = timing.Pair(
                model, runtime, batch_size, threads, jit_compile,
                PROFILE_TIMING["block_ms"], PROFILE_TIMING["budget_ms"],
                limits, path=files.get("full", lambda: model)[1])
        else:
            self.full = float(measure(model))

    def change(self, name, build) -> tuple[float, float]:
        """`(change, full_ms)`: the latency of the variant `build()` makes,
        called `name`, over the full model's timed with it, minus 1, and
        the full model's."""
        if self.measure is not None:
            return float(self.measure(build())) / self.full - 1.0, self.full
        stats = self.pair.compare(self.files.timed(
            name, lambda: self.pair.timed(*self.files.get(name, build))))
        return stats["ratio"] - 1.0, stats["first_ms"]

    def close(self) -> None:
        if self.pair is not None:
            self.pair.close()


def measure(model, an, work, args, verbose):
    """One attempt: `(changes, full_ms)`, every variant of `work` timed
    (`(widths, removed blocks)` each, `design.variant`; `args` are
    `Timer`'s after the model).

    Each variant's change is its latency over the full model's in the same
    interleaved rounds, minus 1 (times `full_ms`, the full model's median
    over the attempt, the change in ms): a slow phase of the machine scales
    both and cancels, in part (`benchmarks/timing_noise.py` measures how
    much). Variants whose full model ran more than `timing.SLOW_PHASE`
    times its fastest are timed again after the others, up to
    `timing.RETIMES` times, keeping the timing with the fastest full
    model."""
    timer = Timer(model, *args)
    builds = [functools.partial(design.variant, model, an, *w)
              for w in work]
    bar = keras.utils.Progbar(len(builds), verbose=verbose,
                              unit_name="variant")
    timed = []
    try:
        for k, build in enumerate(builds):
            timed.append(timer.change(f"variant{k}", build))
            bar.update(k + 1)
        for _ in range(timing.RETIMES):
            fastest = min(ms for _, ms in timed)
            slow = [k for k, (_, ms) in enumerate(timed)
                    if ms > timing.SLOW_PHASE * fastest]
            if not slow:
                break
            if verbose:
                print(f"Timing again {len(slow)} of {len(timed)} variants: "
                      "the full model timed with them ran over "
                      f"{timing.SLOW_PHASE}x its fastest.")
            for k in slow:
                timed[k] = min(timed[k], timer.change(f"variant{k}",
                                                      builds[k]),
                               key=lambda t: t[1])
    finally:
        timer.close()
    fulls = sorted(ms for _, ms in timed)
    return np.array([c for c, _ in timed]), float(fulls[len(fulls) // 2])
