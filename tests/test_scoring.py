"""Tests of `kc.plan_from_scores` (per group and global under MACs)."""

import numpy as np
import pytest

import keras_csgd as kc
from keras_csgd.clusters import target_width
from keras_csgd.plan import PruningPlan
from zoo import bottleneck_resnet, randomize


@pytest.fixture(scope="module")
def model():
    return randomize(bottleneck_resnet(), seed=2)


@pytest.fixture(scope="module")
def scores(model):
    rng = np.random.default_rng(0)
    return {
        g.name: rng.normal(size=g.size) * (i + 1)
        for i, g in enumerate(kc.channel_groups(model))
        if g.prunable
    }


def kept(plan, name):
    return [c[0] for c in plan.clusters[name]]


def test_per_group_keeps_top(model, scores):
    plan = kc.plan_from_scores(model, scores, keep=0.3)
    assert plan.bound
    for name, s in scores.items():
        width = target_width(len(s), 0.3)
        assert kept(plan, name) == sorted(np.argsort(-s)[:width].tolist())
    plan = kc.plan_from_scores(model, scores, keep=0.5, round_to=4)
    assert all(w % 4 == 0 for w in plan.widths().values())


def test_global_meets_macs_budget_minimally(model, scores):
    budget = 0.6
    full = kc.count_macs(model)
    plan = kc.plan_from_scores(model, scores, macs_budget=budget)
    assert kc.count_macs(kc.slim(model, plan)) <= budget * full
    normalized = {n: s / np.abs(s).max() for n, s in scores.items()}
    removed = [
        (normalized[n][i], n, i)
        for n, s in scores.items()
        for i in range(len(s))
        if i not in kept(plan, n)
    ]
    kept_values = [normalized[n][i] for n in scores for i in kept(plan, n)
                   if len(kept(plan, n)) > 1]
    assert max(v for v, _, _ in removed) <= min(kept_values)
    # Minimal: giving back the best removed channel breaks the budget.
    _, name, i = max(removed)
    clusters = {n: [[c] for c in kept(plan, n)] for n in scores}
    clusters[name] = [[c] for c in sorted(kept(plan, name) + [i])]
    bigger = PruningPlan(clusters, groups=kc.channel_groups(model))
    assert kc.count_macs(kc.slim(model, bigger)) > budget * full


def test_global_is_invariant_to_group_scale(model, scores):
    scaled = {n: s * (100.0 if k % 2 else 0.01)
              for k, (n, s) in enumerate(scores.items())}
    a = kc.plan_from_scores(model, scores, macs_budget=0.7)
    b = kc.plan_from_scores(model, scaled, macs_budget=0.7)
    assert a == b


def test_errors(model, scores):
    name = next(iter(scores))
    with pytest.raises(ValueError, match="one score per channel"):
        kc.plan_from_scores(model, {name: np.ones(3)}, keep=0.5)
    with pytest.raises(ValueError, match="cannot be pruned"):
        kc.plan_from_scores(model, {"nope": np.ones(3)}, keep=0.5)
    frozen = next(g for g in kc.channel_groups(model) if not g.prunable)
    with pytest.raises(ValueError, match="cannot be pruned"):
        kc.plan_from_scores(model, {frozen.name: np.ones(frozen.size)}, 0.5)
    with pytest.raises(ValueError, match="`round_to`"):
        kc.plan_from_scores(model, scores, macs_budget=0.5, round_to=8)
    with pytest.raises(ValueError, match="`macs_budget`"):
        kc.plan_from_scores(model, scores, macs_budget=2)
    with pytest.raises(TypeError, match="`scores`"):
        kc.plan_from_scores(model, [1, 2], 0.5)
