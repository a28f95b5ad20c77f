"""Checks a fresh latency table makes on itself before it is cached.

On a busy machine timing noise can fit a table that predicts the full
model's latency badly, says that a narrower width is slower than a wider
one, or that removing a block costs time; every later plan of that
structure would use it. `problems` lists what is wrong with a table, each
test against a share of the full latency (`max_error`):

- *fit*: the RMS residual of the least-squares fit
  (`fields["fit_rms_ms"]`) is at most `max_error` of the full latency;
- *held-out*: the RMS error of its predictions for variants the fit did
  not see is at most `HELD_OUT_ERROR` of the full latency (or twice
  `max_error`, when larger). These variants narrow every group at once,
  where latency is not additive even on a quiet machine: a quiet ResNet-56
  on LiteRT (fit residual 1.5% of full) missed by 6.6%
  (`benchmarks/results/latency_target_quick.json`). What noise adds
  beyond that the fit, order and sign tests see; plans are verified by
  timing in any case;
- *order*: no group measures slower at a width than at a wider one (the
  full width included) by more than `max_error`, unless, given the
  fitted changes' standard errors (`errors`), the difference is more than
  `SIGNIFICANT` of them: that is the runtime's, not noise (on ONNX
  Runtime with AVX-512 a 16-channel group narrowed to 12 runs slower,
  repeatably: MLAS blocks channels by 16), and so is a width of a group
  slower than a wider one in every one of several measurements
  (`reproduced`);
  `runtime_effects` lists them.
  Plans use each group's monotone lower envelope either way;
- *sign*: no block's removal costs more than `max_error`.
"""

from __future__ import annotations

import numpy as np

MAX_ERROR = 0.03
HELD_OUT_ERROR = 0.1
# Standard errors beyond which a narrower width's slowness is the runtime's.
SIGNIFICANT = 4.0


def problems(table, held_out=(), max_error: float = MAX_ERROR,
             errors=None, reproduced=frozenset()) -> list[str]:
    """What is wrong with `table`, as sentences (empty when clean).

    Args:
        table: a `LatencyTable` with `fields["fit_rms_ms"]` (when fitted).
        held_out: `(widths, measured change in ms)` of variants the fit did
            not use. Defaults to `()`.
        max_error: the share of the full latency each test allows.
            Defaults to `0.03`.
        errors: `{group: {width: standard error of its ms}}` of a fitted
            table (the full width: 0). Defaults to `None`: every order
            violation counts.
        reproduced: `(group, width)` pairs measured slower than a wider
            width in every one of several measurements (`slower_widths`
            of each): the runtime's, not noise. Defaults to none.

    Returns:
        One sentence per failed test.
    """
    full, out = table.full, []
    fit = table.fields.get("fit_rms_ms")
    if fit is not None and fit > max_error * full:
        out.append(f"the fit's RMS residual is {fit:.3g} ms, "
                   f"{fit / full:.1%} of the full {full:.3g} ms")
    if len(held_out):
        misses = [table.predict(w) - full - delta for w, delta in held_out]
        rms = float(np.sqrt(np.mean(np.square(misses))))
        if rms > max(HELD_OUT_ERROR, 2 * max_error) * full:
            out.append(f"predictions for {len(misses)} held-out variants "
                       f"miss by {rms:.3g} ms RMS, {rms / full:.1%} of full")
    for name, width, worse, _ in _slower(table, max_error, errors,
                                         reproduced):
        out.append(f"group {name!r} measures {worse:.3g} ms slower at width "
                   f"{width} than at a wider width")
    for name, b in table.blocks.items():
        if -b["saving_ms"] > max_error * full:
            out.append(f"removing block {name!r} costs "
                       f"{-b['saving_ms']:.3g} ms")
    return out


def runtime_effects(table, errors, max_error: float = MAX_ERROR,
                    reproduced=frozenset()) -> list:
    """The order violations `problems` leaves to the runtime: narrower
    widths that measure slower than a wider one by more than `max_error`
    and either `SIGNIFICANT` standard errors or in every measurement
    (`reproduced`), as sentences."""
    return [f"group {name!r} measures {worse:.3g} ms slower at width "
            f"{width} than at {wider} ("
            + ("in every measurement" if (name, width) in reproduced else
               f"{worse / se:.0f} standard errors") + ")"
            for name, width, worse, (wider, se) in _slower(
                table, max_error, errors, reproduced, runtime=True)]


def slower_widths(table, max_error: float = MAX_ERROR) -> set:
    """`(group, width)` of every width that measures slower than a wider
    one of its group by more than `max_error` of the full latency."""
    out = set()
    for name in table.groups:
        widths, worse, _ = _above_wider(table, name)
        out |= {(name, int(w)) for w in widths[worse > max_error * table.full]}
    return out


def _above_wider(table, name) -> tuple:
    """`(widths, ms above the fastest wider width, index of that width)`
    of group `name`'s measured points."""
    widths, ms = table.points(name)
    wider = np.array([int(np.argmin(ms[:k + 1])) for k in range(len(ms))])
    return widths, ms - ms[wider], wider


def _slower(table, max_error, errors, reproduced=frozenset(),
            runtime=False):
    """`(group, width, ms slower, (wider width, standard error))` of each
    group's largest order violation beyond `max_error` that is noise
    (`runtime=False`: within `SIGNIFICANT` standard errors, or any without
    `errors`, at a `(group, width)` not `reproduced`) or the runtime's
    (`runtime=True`: the others)."""
    for name in table.groups:
        widths, worse, wider = _above_wider(table, name)
        se = np.zeros(len(widths))
        if errors is not None:
            e = errors.get(name, {})
            se = np.array([np.hypot(e.get(int(widths[k]), 0.0),
                                    e.get(int(widths[j]), 0.0))
                           for k, j in enumerate(wider)])
        beyond = worse > SIGNIFICANT * se if errors is not None else (
            np.zeros(len(widths), bool))
        beyond |= np.array([(name, int(w)) in reproduced for w in widths],
                           bool)
        worse = np.where((worse > max_error * table.full)
                         & (beyond == runtime), worse, 0.0)
        k = int(np.argmax(worse))
        if worse[k] > 0:
            yield name, int(widths[k]), float(worse[k]), (
                int(widths[wider[k]]), float(se[k]))
