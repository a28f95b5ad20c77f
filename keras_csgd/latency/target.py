"""`plan_for_latency`: a plan whose slim model runs at a latency target.

Profile (or take) the latency table, choose widths and removed blocks that
keep the most importance within `target` times the full latency
(`planner.choose`), then verify: slim, export for the runtime (`kc.export`;
TensorFlow: fold and compile) and time slim against full, interleaved
(`verify.Verifier`). A miss of more than
`tolerance` re-plans for the prediction that the verified plans say
measures the target (secant steps: the table's error near the chosen
point), kept inside the bracket of budgets the verified plans set (else
bisected), a bounded number of times.
"""

from __future__ import annotations

import tempfile
import warnings

import numpy as np

from keras_csgd import checks, flops, graph, llm
from keras_csgd.clusters import make_plan, mergeable, uniform_widths
from keras_csgd.latency import planner, timing
from keras_csgd.latency.design import GRID, prunable_groups, width_plan
from keras_csgd.latency.profile import profile
from keras_csgd.latency.report import (
    LatencyReport,
    default_scores,
    kept_importance,
)
from keras_csgd.latency.verify import Verifier
from keras_csgd.plan import PruningPlan
from keras_csgd.runtimes.tensorflow import xla
from keras_csgd.scoring import checked_scores, top_channels
from keras_csgd.surgery import slim

CLUSTERS = ("prune", "kmeans")
# Largest step past the verified plans, in steps of the proportional
# correction (see `corrected_ratio`).
MAX_EXTRAPOLATION = 3.0
# The default allowed relative miss of a measured ratio (`tolerance`).
TOLERANCE = 0.05
# Halvings of the bracket of verified budgets tried for an untimed plan.
BISECTIONS = 3


def met(ratio, target, tolerance=TOLERANCE) -> bool:
    """Whether a measured latency `ratio` meets `target`: at most
    `tolerance` (relative) above it."""
    return ratio <= target * (1 + tolerance)


def plan_for_latency(model, target, runtime="litert", batch_size=1,
                     scores=None, *, table=None, clusters="prune",
                     threads=None, grid=GRID, tolerance=TOLERANCE,
                     max_iterations=6, jit_compile="auto", cache_dir=None,
                     measure=None, verify=True, return_report=False, seed=0,
                     uniform=None, verbose=1):
    """A plan whose slim model runs at `target` times the full latency.

    1. *Profile*: the latency table of the model on `runtime` at
       `batch_size` on this machine (`kc.latency.profile`, cached), unless
       `table` is given.
    2. *Plan*: a width per scored group, chosen among its measured widths
       (never one that measures slower than a wider one), and the residual
       blocks to remove, keeping the most importance (each group's scores
       divided by their largest, summed over kept channels; a removed block
       loses its inner groups) within the predicted budget
       `target * table.full`: an exact multiple-choice knapsack. Or, with
       `uniform`, one `keep` for every group (`kc.make_plan`'s widths:
       `clusters.uniform_widths`), the largest whose plan the table
       predicts within the budget.
    3. *Verify*: the slim model is exported for the runtime (`kc.export`,
       checked against Keras) or folded and compiled (TensorFlow) and timed
       against the full model, interleaved. Where `slim / full` misses
       `target` by more than `tolerance` (relative; slower, or faster than
       needed), the plan is
       made again for the prediction that the verified plans say measures
       `target` (secant steps on predicted against measured ratios, see
       `corrected_ratio`; a budget outside the bracket that the verified
       plans set, or whose plan was timed, bisects the bracket instead), at
       most `max_iterations` plans in all. The plan meeting the target with
       the most importance is returned. Where the
       correction asks for less than the table's fastest plan, that plan is
       timed: when it misses too, the target is unreachable (`ValueError`);
       when the tries run out first, a warning says why and the fastest
       measured plan is returned.

    Args:
        model: a functional or Sequential single-input `keras.Model`. It is
            not changed.
        target: the slim latency as a fraction of the full model's, in
            (0, 1).
        runtime: one of `kc.latency.RUNTIMES` (`"litert"`,
            `"litert-int8"`, `"onnxruntime"`, `"openvino"`,
            `"tensorflow"`, ...; see `kc.latency.profile`). Defaults to
            `"litert"`.
        batch_size: batch size of the timed calls. Defaults to `1`.
        scores: `{group_name: per-channel scores}` from any method
            (`kc.methods.ensemble_importance`, CaP, ...); only scored groups
            are planned. Defaults to `None`: L1 filter norms of every
            prunable group.
        table: a `LatencyTable` of this model to plan from. Defaults to
            `None` (profiled).
        clusters: `"prune"` (singleton clusters of the best-scored channels:
            plain pruning, `kc.slim` at once or after fine-tuning) or
            `"kmeans"` (k-means clusters of the producer filters at the
            chosen widths, for `kc.CSGD`; the groups of
            `keras_csgd.clusters.mergeable` alone: prune-only groups, see
            `ChannelGroup.exact`, are left unplanned). Defaults to
            `"prune"`.
        threads: the runtime's threads. Defaults to `None` (the usable
            cores).
        grid: width fractions profiled. Defaults to `(0.75, 0.5, 0.25)`.
        tolerance: allowed relative miss of the measured ratio. Defaults to
            `0.05`.
        max_iterations: most plans verified. Defaults to `6`.
        jit_compile: XLA for the TensorFlow runtime (`True`, `False` or
            `"auto"`: on a GPU only). Defaults to `"auto"`.
        cache_dir: latency cache folder. Defaults to `None` (see `profile`).
        measure: a function `model -> ms` used instead of timing, for
            profiling and verifying. Defaults to `None`.
        verify: time the result. Defaults to `True`.
        return_report: also return a `LatencyReport`. Defaults to `False`.
        seed: k-means seed. Defaults to `0`.
        uniform: plan one `keep` for every group instead of a width per
            group: every decoder layer of an LLM gets the same widths, a
            grouped-query attention is cut on its key/value heads or on
            the query heads within every key/value group (whichever keeps
            nearer `keep` of the query heads), and the hidden width
            follows the heads where the class derives the head size, so a
            keras_hub decoder backbone keeps its class and `generate`
            after `kc.slim`. Defaults to `None`: uniform for a keras_hub
            decoder backbone (`keras_csgd.llm.is_decoder_backbone`).
        verbose: `1` shows the profiling progress bar. Defaults to `1`.

    Returns:
        A bound `PruningPlan` (its `remove_blocks` set; `kc.slim(model,
        plan)` applies them), or `(plan, report)` with `return_report=True`.

    Raises:
        ValueError: `target` not in (0, 1), an unknown `runtime`,
            `batch_size < 1`, a model without a prunable group, bad `scores`
            or `table`, or a target below the fastest reachable ratio (the
            message names it: measured, or the table's with
            `verify=False`).

    Example:

    ```python
    plan, report = kc.plan_for_latency(model, 0.5, runtime="litert",
                                       return_report=True)
    print(report)
    small = kc.slim(model, plan)
    ```
    """
    checks.fraction("target", target, high_closed=False)
    checks.choice("clusters", clusters, CLUSTERS)
    checks.choice("uniform", uniform, (None, True, False))
    checks.fraction("tolerance", tolerance, low_open=False, high_closed=False)
    checks.positive_int("max_iterations", max_iterations)
    checks.choice("runtime", runtime, timing.RUNTIMES)
    checks.positive_int("batch_size", batch_size)
    jit_compile = xla(jit_compile)
    an = graph.analyze(model)
    prunable_groups(model, an)
    by_name = {g.name: g for g in an.groups}
    scores = checked_scores(
        default_scores(model, an) if scores is None else scores, by_name
    )
    if clusters == "kmeans":  # C-SGD's merges (`clusters.mergeable`)
        merge = set(mergeable(model, an))
        scores = {n: s for n, s in scores.items() if n in merge}
    threads = checks.positive_int("threads", threads, allow_none=True)
    threads = timing.cores() if threads is None else threads
    if table is None:
        table = profile(
            model, runtime, batch_size, threads=threads, grid=grid,
            jit_compile=jit_compile, cache_dir=cache_dir, measure=measure,
            verbose=verbose,
        )
    missing = sorted(set(scores) - set(table.groups))
    if missing or any(table.groups[n]["size"] != by_name[n].size
                      for n in scores):
        raise ValueError(
            "`table` must be a latency table of this model (it lacks or "
            f"resizes groups {missing[:5]}). Received: table={table!r}"
        )
    values = planner.kept_values(scores)
    choices = None  # the knapsack's, or the uniform plans
    if llm.is_decoder_backbone(model) if uniform is None else uniform:
        choices = planner.uniform_choices(table, values, lambda keep: (
            uniform_widths(model, an, list(values), keep)))
    fastest = planner.fastest(table, values, choices) / table.full
    if target < fastest and not verify:
        raise ValueError(_unreachable(target, fastest))
    chosen, reason = _search(model, an, table, values, choices, target,
                             tolerance, max_iterations, measure, verify,
                             (runtime, batch_size, threads, jit_compile))
    plan = plan_at_widths(model, chosen["widths"], chosen["remove"], scores,
                          clusters=clusters, seed=seed, analysis=an)
    if reason:
        warnings.warn(f"`plan_for_latency`: {reason}", stacklevel=2)
    if not return_report:
        return plan
    report = LatencyReport(
        target=float(target), runtime=runtime, batch_size=batch_size,
        full_ms=chosen.get("full_ms", table.full),
        slim_ms=chosen.get("slim_ms"), measured_ratio=chosen.get("measured"),
        predicted_ms=chosen["predicted_ms"],
        predicted_ratio=chosen["predicted_ms"] / table.full,
        met=None if not verify else reason is None,
        macs=None if any(c.macs is None for c in an.costs) else (
            flops.count_macs(model, an), flops.macs_under(model, plan, an)),
        params=(model.count_params(), chosen["params"]),
        widths={n: (w, by_name[n].size) for n, w in plan.widths().items()},
        remove_blocks=list(plan.remove_blocks),
        kept_importance=kept_importance(model, plan, scores),
        iterations=chosen["history"], reason=reason,
    )
    return plan, report


def _search(model, an, table, values, uniform, target, tolerance,
            max_iterations, measure, verify, args):
    """Plans (among the `uniform` plans, when given) and verifies until the
    target is met or the tries run out.

    The next budget is the secant correction (`corrected_ratio`) kept inside
    the bracket of budgets the verified plans set: below the least budget
    whose plan missed, above the largest whose plan met needlessly fast.
    Where it falls outside, or on a plan already timed, the bracket is
    bisected. A budget's plan is the most valuable of every plan chosen so
    far that the table puts within it (`planner.choose` is not monotone in
    the budget where the table has interactions): a larger budget never
    gets a less valuable plan.

    Returns:
        `(chosen, reason)`: the decision (`widths`, `remove`,
        `predicted_ms`, `params`, the measured fields and `history`) and
        why the target was not met (or `None`).
    """
    sizes = {g.name: g.size for g in an.groups}
    budget, history, best, tried = target * table.full, [], None, []
    pool, met_at, missed_at = [], [], [table.full]
    reason = "no plan was verified"
    with tempfile.TemporaryDirectory() as folder, Verifier(
        model, *args, measure, folder, table.full
    ) as verifier:
        floor = planner.fastest(table, values, uniform)
        for k in range(max_iterations):
            fastest = budget < floor
            budget = max(budget, floor)  # below it: the fastest plan
            high = min(missed_at)
            low = max([b for b in met_at if b < high], default=floor)
            found = _untried(table, values, uniform, budget, (low, high),
                             pool, tried, sizes, first=fastest or not tried)
            if found is None:
                if fastest and reason is not None:
                    raise ValueError(_unreachable(
                        target, floor / table.full,
                        min(h["measured_ratio"] for h in history)))
                break  # every plan in the bracket is timed
            budget, choice, widths, mark = found
            fastest = fastest and budget == floor
            tried.append(mark)
            variant = slim(model, width_plan(model, an, widths, choice[1]),
                           check=False)
            chosen = {"widths": widths, "remove": choice[1],
                      "predicted_ms": choice[2], "value": choice[3],
                      "params": variant.count_params()}
            if not verify:
                best, reason = chosen, None
                break
            full_ms, slim_ms, ratio = verifier(variant, f"slim{k}")
            chosen.update(full_ms=full_ms, slim_ms=slim_ms, measured=ratio)
            history.append({
                "budget_ratio": budget / table.full,
                "predicted_ratio": choice[2] / table.full,
                "measured_ratio": ratio,
            })
            if not met(ratio, target, tolerance):
                missed_at.append(budget)
                if fastest and reason is not None:
                    raise ValueError(_unreachable(target, floor / table.full,
                                                  ratio))
                if reason is not None and (
                    best is None or ratio < best["measured"]
                ):
                    best = chosen
                    reason = (
                        f"the fastest of {len(history)} verified plans "
                        f"measures {ratio:.3f} of the full latency, above "
                        f"the target {target:g} (+{tolerance:g}); the "
                        "machine may be busy, or latency at these widths is "
                        "not additive"
                    )
            else:
                if reason is not None or best["value"] < chosen["value"]:
                    best = chosen
                reason = None
                if ratio >= target * (1 - tolerance):
                    break  # met, and not needlessly fast
                met_at.append(budget)
            budget = table.full * min(1.0, corrected_ratio(
                [(h["predicted_ratio"], h["measured_ratio"])
                 for h in history], target,
            ))
    if best is None:
        raise ValueError(
            f"`target` cannot be met: {reason}. Received: target={target!r}"
        )
    best["history"] = history
    return best, reason


def _untried(table, values, uniform, budget, bracket, pool, tried, sizes,
             first=False):
    """The first budget, of `budget` (when inside the open `bracket`, or
    `first`) then the bracket's bisection points (depth `BISECTIONS`),
    whose plan is not yet in `tried`: `(budget, choice, widths, mark)`, or
    `None`.

    A budget's plan is the most valuable plan within it among `pool` (every
    plan chosen so far, extended here) and `planner.choose`'s own.
    """
    low, high = bracket
    budgets = [budget] if first or low < budget < high else []
    for depth in range(1, BISECTIONS + 1):
        n = 2 ** depth
        budgets += [low + (high - low) * i / n for i in range(1, n, 2)]
    for b in budgets:
        own = planner.choose(table, values, b, uniform=uniform)
        if own is not None and own not in pool:
            pool.append(own)
        within = [c for c in pool if c[2] <= b + 1e-9]
        if not within:
            continue
        choice = max(within, key=lambda c: c[3])
        widths = {n: w for n, w in choice[0].items() if w < sizes[n]}
        mark = (sorted(widths.items()), choice[1])
        if mark not in tried:
            return b, choice, widths, mark
    return None


def _unreachable(target, predicted, measured=None) -> str:
    how = (f"{predicted:.3f}" if measured is None else
           f"{measured:.3f} as measured ({predicted:.3f} predicted)")
    return (
        f"`target` is below the fastest reachable latency, {how} of the "
        "full model's (every scored group at its narrowest measured width "
        "and every removable block removed; frozen groups and fixed per-op "
        f"costs hold the rest). Received: target={target!r}"
    )


def corrected_ratio(points, target) -> float:
    """The predicted ratio to plan for next, from the verified plans.

    `points` are `(predicted, measured)` ratios of the verified plans; with
    the full model's `(1, 1)` they sample how the measured ratio follows
    the table's prediction. With two or more plans, the next prediction is
    where the line through the two samples that bracket `target` (else the
    two nearest it) meets `target`: secant steps, exact where the table is
    off by a factor and a fixed amount (per-op costs no width changes).
    After one plan, two corrections are averaged: the line through it and
    `(1, 1)` (the table misses a fixed cost) and the prediction scaled by
    `target / measured` (it misses a factor); the line alone overshoots
    where savings fall off at narrow widths (MobileNetV2 on LiteRT). Where
    the samples are not increasing (timing noise), the last prediction is
    scaled. Beyond the samples, the secant's step from the last prediction
    is at most `MAX_EXTRAPOLATION` times the scaled one's: two plans that
    measure nearly alike (noise) give a nearly flat line whose crossing lies
    far away (a ResNet-20 on LiteRT went from 0.42 predicted to 0.05).
    """
    last_p, last_m = points[-1]
    scaled = last_p * target / last_m
    samples = sorted(set(points) | {(1.0, 1.0)})
    below = [(p, m) for p, m in samples if m <= target]
    above = [(p, m) for p, m in samples if m > target]
    if below and above:
        pair = [max(below, key=lambda s: s[1]), min(above, key=lambda s: s[1])]
    else:
        pair = sorted(samples, key=lambda s: abs(s[1] - target))[:2]
    (p0, m0), (p1, m1) = pair
    if p0 == p1 or (m1 - m0) / (p1 - p0) <= 0:
        return float(scaled)
    line = p0 + (target - m0) * (p1 - p0) / (m1 - m0)
    if len(set(points)) == 1:
        return float((line + scaled) / 2)
    if not (below and above):  # extrapolating: a flat secant is noise
        limit = MAX_EXTRAPOLATION * abs(scaled - last_p)
        line = float(np.clip(line, last_p - limit, last_p + limit))
    return float(line)


def plan_at_widths(model, widths, remove_blocks=(), scores=None, *,
                   clusters="prune", seed=0, analysis=None) -> PruningPlan:
    """The bound plan of given widths and removed blocks (the result of a
    latency search, or a plan made elsewhere carried out by another
    method): each group keeps its best-scored channels, or k-means
    clusters of its producer filters (C-SGD's merges).

    Args:
        model: the functional or Sequential `keras.Model`.
        widths: `{group_name: kept channels}`.
        remove_blocks: the `Add` layers whose branch goes. Defaults to `()`.
        scores: `{group_name: one score per channel}` choosing the kept
            channels of every group in `widths` (`"prune"`). Defaults to
            `None` (L1 filter norms).
        clusters: `"prune"` or `"kmeans"`. Defaults to `"prune"`.
        seed: k-means seed. Defaults to `0`.
        analysis: `graph.analyze(model)` when at hand. Defaults to `None`.

    Returns:
        A bound `PruningPlan`, with the gates of its removed blocks where
        `PruningPlan.bind_blocks` finds them (`kc.CSGD` drives those to 0).

    Raises:
        ValueError: an unknown or frozen group, a width out of range, bad
            `clusters`.
    """
    checks.choice("clusters", clusters, CLUSTERS)
    an = analysis or graph.analyze(model)
    by_name = {g.name: g for g in an.groups}
    if clusters == "kmeans" and widths:
        chosen = make_plan(
            model, keep={n: w / by_name[n].size for n, w in widths.items()},
            method="kmeans", seed=seed,
        ).clusters
    else:
        scores = checked_scores(
            default_scores(model, an) if scores is None else scores, by_name)
        chosen = {}
        for name, width in widths.items():
            if name not in scores or not 1 <= width <= by_name[name].size:
                raise ValueError(
                    f"`widths[{name!r}]` must be in [1, size] of a scored, "
                    f"prunable group. Received: {width!r}"
                )
            chosen[name] = top_channels(scores[name], int(width))
    plan = PruningPlan(chosen, groups=an.groups, remove_blocks=remove_blocks)
    plan.analysis = (model, an)
    try:  # the gates `kc.CSGD` drives to 0; without them it says why
        plan.bind_blocks(model)
    except ValueError:
        pass
    return plan
