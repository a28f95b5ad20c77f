"""Compensating removed residual blocks: refit the layers that read them.

Removing a block replaces its `Add` output `s + b` by the shortcut `s`.
The first Conv/Dense layers that read that output (through weightless
one-input operations such as ReLU, and through further removed blocks) can
absorb much of the change: with the patch vectors `p` they read in the
unpruned model and `q` they read in the slim one, on the same data,

```
K_new = Cov(q, q)^-1 Cov(q, p) K
b_new = b + E[p] K - E[q] K_new
```

is the least-squares fit of the unpruned layer's output (`K` its Keras
kernel `(d, out)`, restricted to the kept output channels) from the slim
model's inputs: CaP's refit (`solve.least_squares`) with the inputs of two
models instead of a subset of one. A kept `Add` that reads the removed
block (an identity shortcut) has no weights to refit: what passes there is
not compensated.
"""

from __future__ import annotations

import keras
import numpy as np

from keras_csgd import blocks, graph
from keras_csgd.batches import input_batches
from keras_csgd.methods.compensation.solve import cross_least_squares
from keras_csgd.methods.compensation.statistics import _patches, supported
from keras_csgd.methods.moments import RunningMoments


def block_readers(model, names) -> list[str]:
    """The supported Conv/Dense layers that read the removed blocks' outputs.

    Walks forward from each removed `Add` through weightless one-input
    layers and through other removed blocks' `Add`s (never into a removed
    branch); stops at anything else (a kept `Add` cannot be refitted and
    is left out).
    """
    readers = graph.successors(model)
    removed = set(names)
    found, seen = [], set(blocks.dropped_operations(model, names)) - removed
    stack = list(names)
    while stack:
        name = stack.pop()
        for reader in readers.get(name, ()):
            if reader is None or reader in seen:
                continue
            seen.add(reader)
            layer = model.get_layer(reader)
            if supported(layer) and "/" not in reader:
                found.append(reader)
            elif reader in removed or (
                not layer.weights and len(graph.call_inputs(layer) or ()) == 1
            ):
                stack.append(reader)
    return sorted(found)


def _kept_outputs(analysis, index, name, width) -> np.ndarray:
    """Old output channels of `name` that its slim layer keeps."""
    outs = [e.layout for e in analysis.entries_of(name) if e.producer]
    if not outs:
        return np.arange(width)
    return index.select(analysis.root(outs[0]))


def refit_block_readers(model, slim_model, plan, data, ridge=1e-8,
                        batch_size=64, max_batches=None) -> dict:
    """Refits, in `slim_model`, the layers that read removed blocks.

    Args:
        model: the unpruned model.
        slim_model: its slim model (`kc.slim` or `compensate` of `plan`),
            changed in place.
        plan: the bound plan (its `remove_blocks`), with singleton
            clusters (the kept channels).
        data: inputs `keras_csgd.batches` reads.
        ridge: ridge relative to the mean input variance. Defaults to
            `1e-8`.
        batch_size: batch size for NumPy `data`. Defaults to `64`.
        max_batches: stop after this many batches. Defaults to `None`.

    Returns:
        `{layer name: (kernel, bias change)}` for `slim_model`, for
        `refit._with_updates`.
    """
    names = block_readers(model, plan.remove_blocks)
    if not names:
        return {}
    analysis = graph.analyze(model)
    index = graph.Reindex(analysis, plan)
    old = [model.get_layer(n) for n in names]
    new = [slim_model.get_layer(n) for n in names]
    probe_old = keras.Model(model.input, [layer.input for layer in old])
    probe_new = keras.Model(slim_model.input,
                            [layer.input for layer in new])
    moments = [None] * len(names)
    for step, x in enumerate(input_batches(data, batch_size)):
        if max_batches is not None and step >= max_batches:
            break
        pairs = zip(probe_old(x, training=False),
                    probe_new(x, training=False))
        for i, (xo, xn) in enumerate(pairs):
            rows = np.concatenate(
                [_patches(xn, new[i]), _patches(xo, old[i])], axis=1
            )
            if moments[i] is None:
                moments[i] = RunningMoments(rows.shape[1])
            moments[i].update(rows)
    updates = {}
    for i, name in enumerate(names):
        kernel = old[i].kernel.numpy().astype(np.float64)
        k2d = kernel.reshape(-1, kernel.shape[-1])
        keep = _kept_outputs(analysis, index, name, k2d.shape[1])
        k2d = k2d[:, keep]
        bias = (old[i].bias.numpy()[keep] if old[i].use_bias
                else np.zeros(len(keep)))
        k_new, delta = cross_least_squares(
            moments[i].covariance(), moments[i].mean, k2d, ridge
        )
        b_new = bias + delta
        current = new[i].bias.numpy() if new[i].use_bias else 0.0
        updates[name] = (k_new.reshape(new[i].kernel.shape), b_new - current)
    return updates

