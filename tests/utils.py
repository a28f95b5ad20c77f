"""Test helpers shared by several test modules.

Test modules import them as `from utils import ...` (pytest puts `tests/`
on the path).
"""

import inspect
import warnings

import numpy as np
import tensorflow as tf

import keras_csgd as kc
from keras_csgd import graph


def collapse(model, plan):
    """Copies each cluster's first member into the others, every member.

    Entries are matched by (channel, occurrence), so channels repeated behind
    a depthwise multiplier or a Flatten are copied repeat by repeat.
    """
    for name, clusters in plan.clusters.items():
        g = plan.groups[name]
        ids = plan.cluster_ids(name)
        first = [c[0] for c in clusters]
        for _, path, axis in g.members:
            var = graph.get_variable(model, path)
            w = np.moveaxis(var.numpy(), axis, 0).copy()
            cmap = g.channel_map(path)
            where = {}
            for i, ch in enumerate(cmap):
                where.setdefault(int(ch), []).append(i)
            for i, ch in enumerate(cmap):
                if ch < 0 or ids[ch] < 0:
                    continue
                rep = where[int(ch)].index(i)
                w[i] = w[where[first[ids[ch]]][rep]]
            var.assign(np.moveaxis(w, 0, axis))


def relative_error(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.abs(a - b).max() / max(1e-12, np.abs(b).max()))


def constructor_arguments(cls):
    """The names of `cls.__init__`'s parameters (no `self`, `*a`, `**kw`)."""
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in variadic
    }


def two_cpu_strategy():
    """MirroredStrategy over the two logical CPUs (made in conftest).

    `ReductionToOneDevice`: the CPU collectives of several strategies in one
    process clash on their instance keys.
    """
    return tf.distribute.MirroredStrategy(
        [d.name for d in tf.config.list_logical_devices("CPU")[:2]],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def macs_latency_plan(model, target, input_shape=None, **kwargs):
    """`(plan, report)` of `kc.plan_for_latency` with the MACs as its
    'runtime' (no timing); the table checks' warnings (MACs are not
    additive across groups) are silenced."""

    def macs_ms(m):
        return kc.count_macs(m, input_shape=input_shape) / 1e3

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kc.plan_for_latency(model, target, measure=macs_ms,
                                   return_report=True, verbose=0, **kwargs)


def kept_query_heads(model, plan, attention):
    """`{kept key/value head: kept query heads}` of the grouped-query
    attention whose groups are `<attention>/kv_heads` and
    `<attention>/query_heads`, in `plan`."""
    groups = {g.name: g for g in kc.channel_groups(model)}
    kv, positions = (groups[f"{attention}/{n}"]
                     for n in ("kv_heads", "query_heads"))
    (query,) = [p for _, p, _ in positions.members
                if p.endswith("query/kernel")]
    kept = [{c[0] for c in plan.clusters.get(g.name, [[i] for i in
                                                     range(g.size)])}
            for g in (kv, positions)]
    counts = {}
    for k, j in zip(kv.channel_map(query), positions.channel_map(query)):
        if k in kept[0]:
            counts[k] = counts.get(k, 0) + (j in kept[1])
    return counts
