"""Choosing widths and blocks under a latency budget: a knapsack.

Every prunable group outside removable blocks is one *item* whose options
are its table choices (the monotone lower envelope of its measured widths);
every removable block is one item whose options are its inner groups'
choices, or its removal. Each option has a latency change (ms) and a value
(the kept importance: the sum of the kept channels' scores, each group's
scores divided by their largest, as in `kc.plan_from_scores`). Picking one
option per item to keep the most value within the budget is a
multiple-choice knapsack, solved exactly by merging Pareto frontiers of
(latency, value), item by item. Where the table scales group changes by
their interactions (`LatencyTable.factors`), the knapsack is solved with the
factors of the previous solution until the choice repeats, and the best
choice that the full prediction puts within the budget is kept; where
none is (interactions that cost more than the summed changes), the
knapsack is solved again for budgets bisected between the fastest plan
and the budget, rather than falling back to the fastest plan.

A *uniform* plan (one `keep` for every group, what a keras_hub decoder
LLM needs to keep its class and `generate`) is chosen among the widths
one `keep` gives (`uniform_choices`), not by the knapsack.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np

MAX_STATES = 4096
MAX_ROUNDS = 8
# Most `keep` values a uniform plan is chosen among (`uniform_choices`).
UNIFORM_STEPS = 256


def kept_values(scores: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`{group: v}` with `v[w]` the value of keeping its `w` best channels.

    Scores are divided by the group's largest absolute score; `v[0] = 0`.
    """
    out = {}
    for name, s in scores.items():
        s = np.abs(np.asarray(s, np.float64))
        top = s.max()
        s = np.sort(s / top if top > 0 else s)[::-1]
        out[name] = np.concatenate([[0.0], np.cumsum(s)])
    return out


def items(table, values: Mapping[str, np.ndarray],
          factors: Mapping[str, float] | None = None) -> list[list[tuple]]:
    """Options `(latency change, value, decision)` of every item.

    A decision is `{"widths": {group: width}, "remove": [block]}`. Only
    groups in `values` are planned; a block is removable when every group
    inside it is planned (and it has one), and when removing it saves
    time. A group's changes are scaled by `factors[group]` (default 1).
    """
    factors = factors or {}
    out, inside = [], set()
    for block, b in table.blocks.items():
        inner = b["groups"]
        if not inner or not set(inner) <= set(values):
            continue
        inside |= set(inner)
        options = _group_options(table, values, inner, factors)
        if b["saving_ms"] > 0:
            options.append(
                (-b["saving_ms"], 0.0, {"widths": {}, "remove": [block]})
            )
        out.append(options)
    for name in table.groups:
        if name in values and name not in inside:
            out.append(_group_options(table, values, [name], factors))
    return out


def _group_options(table, values, names, factors) -> list[tuple]:
    per_group = [
        [(w, (t - table.full) * factors.get(n, 1.0), values[n][w])
         for w, t in table.choices(n)]
        for n in names
    ]
    options = []
    for combo in itertools.product(*per_group):
        options.append((
            sum(c[1] for c in combo), sum(c[2] for c in combo),
            {"widths": {n: c[0] for n, c in zip(names, combo)},
             "remove": []},
        ))
    return options


def uniform_choices(table, values: Mapping[str, np.ndarray],
                    widths_at) -> list[tuple[dict, list, float, float]]:
    """The uniform plans: `(widths, [], predicted_ms, value)` of every
    distinct `widths_at(keep)` for `keep = k / n`, `k = 1 .. n` (`n`: the
    largest planned group's size, at most `UNIFORM_STEPS`).

    Args:
        table: the `LatencyTable`.
        values: `kept_values` of the planned groups.
        widths_at: `keep -> {group: width}` for the groups of `values`
            (`keras_csgd.clusters.uniform_widths`).
    """
    n = min(UNIFORM_STEPS, max(len(v) - 1 for v in values.values()))
    out, seen = [], set()
    for k in range(1, n + 1):
        widths = widths_at(k / n)
        mark = tuple(sorted(widths.items()))
        if mark not in seen:
            seen.add(mark)
            out.append((widths, [], table.predict(widths, []),
                        value_of(values, widths)))
    return out


def fastest_choice(table, values) -> tuple[dict, list]:
    """`(widths, remove_blocks)`: every option at its fastest."""
    widths, removed = {}, []
    for options in items(table, values):
        decision = min(options, key=lambda o: o[0])[2]
        widths.update(decision["widths"])
        removed += decision["remove"]
    return widths, sorted(removed)


def fastest(table, values, uniform=None) -> float:
    """The smallest predicted latency (ms) the planned groups can reach
    (among the `uniform` plans, when given: see `uniform_choices`)."""
    if uniform is not None:
        return min(u[2] for u in uniform)
    return table.predict(*fastest_choice(table, values))


def value_of(values, widths, gone=frozenset()) -> float:
    """Kept value at `widths` (unplanned groups keep all; groups in `gone`,
    inside removed blocks, none)."""
    return sum(0.0 if n in gone else v[widths.get(n, len(v) - 1)]
               for n, v in values.items())


def choose(table, values: Mapping[str, np.ndarray], budget_ms: float,
           max_states: int = MAX_STATES, uniform=None):
    """The options that keep the most value within `budget_ms`.

    Exact for additive tables while the Pareto frontier stays under
    `max_states` states (above, it keeps the best state of each of
    `max_states` latency bins); with interactions, see the module. With
    `uniform` (`uniform_choices`), the best of those plans.

    Returns:
        `(widths, remove_blocks, predicted_ms, value)`, or `None` when even
        the fastest options exceed the budget.
    """
    if uniform is not None:
        within = [u for u in uniform if u[2] <= budget_ms + 1e-9]
        return max(within, key=lambda u: u[3]) if within else None
    quick = fastest_choice(table, values)
    if table.predict(*quick) > budget_ms + 1e-9:
        return None
    candidates, factors, seen = [quick], None, set()
    for _ in range(MAX_ROUNDS):
        choice = _solve(items(table, values, factors),
                        table.additive(budget_ms) - table.full, max_states)
        if choice is None:
            break
        mark = (tuple(sorted(choice[0].items())), tuple(choice[1]))
        if mark in seen:
            break
        seen.add(mark)
        candidates.append(choice)
        if not table.calls:
            break
        factors = table.factors(*choice)
    if not any(table.predict(*c) <= budget_ms + 1e-9
               for c in candidates[1:]):
        candidates += _narrower(table, values, budget_ms, factors,
                                max_states)
    best = None
    for widths, removed in candidates:
        ms = table.predict(widths, removed)
        gone = {g for b in removed for g in table.blocks[b]["groups"]}
        value = value_of(values, widths, gone)
        if ms <= budget_ms + 1e-9 and (best is None or value > best[3]):
            best = (widths, removed, ms, value)
    return best


def _narrower(table, values, budget_ms, factors, max_states):
    """Knapsack choices for budgets bisected between the fastest options'
    summed changes and `budget_ms`'s (`MAX_ROUNDS` steps), for when every
    choice at the budget itself predicts above it (the table's
    interactions cost more than the changes the knapsack sums): the plans
    that fit, instead of the fastest plan alone."""
    items_ = items(table, values, factors)
    low = sum(min(o[0] for o in options) for options in items_)
    high = table.additive(budget_ms) - table.full
    out = []
    for _ in range(MAX_ROUNDS):
        middle = (low + high) / 2
        choice = _solve(items_, middle, max_states)
        if choice is not None and table.predict(*choice) <= budget_ms + 1e-9:
            out.append(choice)
            low = middle
        else:
            high = middle
    return out


def _solve(opts, slack, max_states):
    """The multiple-choice knapsack: `(widths, removed)` or `None`."""
    rest = np.cumsum([0.0] + [min(o[0] for o in x) for x in opts[::-1]])
    rest = rest[::-1]  # rest[k]: least latency change of items k, k+1, ...
    if rest[0] > slack + 1e-9:
        return None
    cost, value = np.zeros(1), np.zeros(1)
    trail = []  # per item: (parent state, option) of every state
    for k, options in enumerate(opts):
        oc = np.array([o[0] for o in options])
        ov = np.array([o[1] for o in options])
        c = (cost[:, None] + oc[None, :]).ravel()
        v = (value[:, None] + ov[None, :]).ravel()
        parent = np.repeat(np.arange(len(cost)), len(options))
        option = np.tile(np.arange(len(options)), len(cost))
        ok = c + rest[k + 1] <= slack + 1e-9
        c, v, parent, option = c[ok], v[ok], parent[ok], option[ok]
        keep = _pareto(c, v, max_states)
        cost, value = c[keep], v[keep]
        trail.append((parent[keep], option[keep]))
    best = int(np.flatnonzero(value == value.max())[0])  # cheapest of best
    widths, removed, state = {}, [], best
    for options, (parent, option) in zip(opts[::-1], trail[::-1]):
        decision = options[option[state]][2]
        widths.update(decision["widths"])
        removed += decision["remove"]
        state = parent[state]
    return widths, sorted(removed)


def _pareto(cost, value, max_states) -> np.ndarray:
    """Indices of the states no cheaper state beats, cheapest first."""
    order = np.lexsort((-value, cost))
    v = value[order]
    best_before = np.concatenate([[-np.inf], np.maximum.accumulate(v)[:-1]])
    keep = order[v > best_before]
    if len(keep) > max_states:
        c = cost[keep]
        bins = np.floor(
            (c - c[0]) / (c[-1] - c[0] + 1e-12) * max_states
        ).astype(int)
        last = np.r_[bins[1:] != bins[:-1], True]  # best value of each bin
        keep = keep[last]
    return keep
