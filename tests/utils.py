"""Test helpers shared by several test modules."""

import numpy as np

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
