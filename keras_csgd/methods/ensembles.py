"""Linear filter ensembles: channel importance from random channel masks."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from sklearn.linear_model import RidgeCV

from keras_csgd import checks, graph
from keras_csgd.batches import fixed_batches

METRICS = ("loss", "accuracy")
# The penalties `ridge="auto"` chooses among (see `chosen_ridge`).
RIDGES = tuple(float(r) for r in np.logspace(-4, 2, 25))


def ensemble_importance(
    model,
    data,
    *,
    samples: int = 512,
    mask_keep: float = 0.99,
    metric: str = "loss",
    ridge: float | str = "auto",
    seed: int = 0,
    verbose: int = 1,
) -> dict[str, np.ndarray]:
    """Importance of every channel of every prunable group, from masks.

    Each of `samples` random masks drops a `1 - mask_keep` share of the
    channels of the prunable groups (binomially many, every channel
    equally often: `balanced_masks`), and `metric` is measured on `data`
    with the mask applied. The importances are the
    coefficients of ONE linear least-squares fit with a ridge penalty over
    all samples:

    ```
    metric ~ w0 + sum_i w_i * m_i      (m_i = 1: channel i kept)
    minimize  mean((metric - w0 - m @ w)^2) + ridge * |w|^2
    ```

    Importance is `w` for `"accuracy"` and `-w` for `"loss"`: larger means
    more important (removing the channel costs more), in the units of the
    metric, so importances compare across groups.

    With barely more masks than channels (512 masks, 448 channels in a
    CIFAR ResNet-20) the fit is ill-conditioned, and a nearly unpenalised one
    ranks channels almost at random: on a trained ResNet-20, two runs of
    512 independent masks at `mask_keep=0.9` (other images and masks)
    ranked each group's channels with a mean Spearman correlation of 0.05
    at `ridge=1e-3`, 0.21 to 0.23 at `0.03` to `0.1`; with
    `balanced_masks` at 0.99, 0.30 to 0.32 at the penalties `"auto"`
    chose (`benchmarks/ensemble_ridge.py`). `ridge="auto"` takes
    the penalty of `RIDGES` with the least leave-one-out error
    (`chosen_ridge`).

    Masks that drop few channels at once measure each channel's own
    effect, where the additive model holds. On that ResNet-20 masks at
    `mask_keep=0.9` drop about 45 channels and raise the loss from 0.8 to
    as much as 15; carried out at its 0.5 latency plan and fine-tuned for
    3 epochs (`benchmarks/latency_methods.py`), the channels chosen at
    0.9 / 0.97 / 0.99 scored 76.19% / 76.70% / 76.88% on held-out images
    (4 seeds; 76.84% with `balanced_masks`; magnitude pruning 76.93%).

    How a mask is applied: dropping channel `c` of a group means that no
    consumer reads it, exactly what `kc.slim` does when it removes `c`. So
    the mask multiplies the input-channel entries of every consumer kernel
    (through Flatten and Concatenate, at every position that reads `c`),
    which is exact for convolutions (zero padding included) and dense
    layers. One compiled `tf.function` assigns the masked consumer kernels
    from saved copies and evaluates `data`; it is traced once, so the whole
    run is about `samples` passes over `data`. The original kernels are
    restored at the end, also on error or interruption.

    Args:
        model: a functional or Sequential `keras.Model` (compiled, for
            `metric="loss"`).
        data: a fixed labelled set: a `tf.data.Dataset` of `(x, y)`
            batches (read once and kept in memory, so a shuffled dataset is
            frozen), a tuple `(x, y)` of arrays (batches of 128), an `.npz`
            or an image folder (see `keras_csgd.batches.fixed_batches`).
        samples: number of random masks. Defaults to `512`.
        mask_keep: the kept fraction of each random mask: the probability
            that a channel is kept, in (0, 1) (called `keep_prob` before;
            a kept fraction, like `keep`). Defaults to `0.99` (`0.9`
            before; see above).
        metric: `"loss"` (the model's compiled loss, averaged over the
            examples) or `"accuracy"` (top-1; integer or one-hot labels).
            Defaults to `"loss"`.
        ridge: ridge penalty (see above), `>= 0`, or `"auto"`: chosen by
            leave-one-out error (`chosen_ridge`). The variance of one mask
            bit is `mask_keep * (1 - mask_keep)` (0.0099 at 0.99), and a
            penalty equal to it halves a lone bit's coefficient. Defaults to
            `"auto"` (`1e-3` before).
        seed: seed of the masks. Defaults to `0`.
        verbose: `1` shows a progress bar. Defaults to `1`.

    Returns:
        `{group_name: float64 array, one importance per channel}` for every
        prunable group.

    Raises:
        ValueError: a bad argument, a model without a prunable group, or
            `metric="loss"` on a model without a single compiled loss.
        TypeError: `data` of an unsupported type.

    Example:

    ```python
    scores = kc.methods.ensemble_importance(model, (x_val, y_val))
    plan = kc.plan_from_scores(model, scores, keep=0.5)
    ```

    References:
        Sandor, Szulc, Grigoras, Bodea. Linear Filter Ensembles for Network
        Pruning. arXiv 2001.08142.
    """
    if checks.positive_int("samples", samples) < 2:
        raise ValueError(
            f"`samples` must be an int >= 2. Received: samples={samples!r}"
        )
    checks.fraction("mask_keep", mask_keep, high_closed=False)
    if ridge != "auto":
        checks.number("ridge", ridge, low=0)
    metric_fn = _metric_fn(model, metric)
    data = fixed_batches(data)
    an = graph.analyze(model)
    groups = [g for g in an.groups if g.prunable]
    if not groups:
        raise ValueError("`model` has no prunable channel group.")
    offsets = np.cumsum([0] + [g.size for g in groups])
    masked = _masked_consumers(model, an, groups, offsets)
    evaluate = _compiled_evaluation(model, data, masked, metric_fn)
    bits = balanced_masks(samples, int(offsets[-1]), mask_keep, seed)
    values = np.empty(samples)
    progbar = keras.utils.Progbar(samples, verbose=verbose) if verbose else None
    try:
        for i in range(samples):
            values[i] = float(evaluate(tf.constant(bits[i])))
            if progbar is not None:
                progbar.update(i + 1)
    finally:
        for variable, original, _, _ in masked:
            variable.assign(original)
    if ridge == "auto":
        ridge = chosen_ridge(bits, values)
    coef = ridge_coefficients(bits, values, ridge)
    if metric == "loss":
        coef = -coef
    return {
        g.name: coef[offsets[k] : offsets[k + 1]]
        for k, g in enumerate(groups)
    }


def balanced_masks(samples: int, channels: int, mask_keep: float,
                   seed: int = 0) -> np.ndarray:
    """`(samples, channels)` float32 bits, 1 where a mask keeps a channel.

    A mask drops as many channels as independent draws with probability
    `1 - mask_keep` would (binomial), but not at random: those the masks
    before it dropped least often, ties broken at random, so that every
    channel is dropped equally often (within one). Independent draws leave
    some channels never dropped (about 2.6 of 448 at 512 masks and
    `mask_keep=0.99`), and the fit sees nothing of them. The number
    dropped varies from mask to mask, so the fit's intercept (the metric
    with every channel kept) is determined.
    """
    rng = np.random.default_rng(seed)
    drops = rng.binomial(channels, 1.0 - mask_keep, samples)
    bits = np.ones((samples, channels), np.float32)
    counts = np.zeros(channels)
    for row, n in zip(bits, drops):
        if n:
            dropped = np.argpartition(counts + rng.random(channels),
                                      n - 1)[:n]
            row[dropped] = 0.0
            counts[dropped] += 1
    return bits


def chosen_ridge(bits: np.ndarray, values: np.ndarray) -> float:
    """The penalty of `RIDGES` (in `ridge_coefficients`' units) whose fit
    has the least leave-one-out squared error (`sklearn.linear_model.
    RidgeCV`'s efficient leave-one-out, intercept fitted)."""
    alphas = np.array(RIDGES) * len(values)
    fit = RidgeCV(alphas=alphas).fit(bits.astype(np.float64),
                                     np.asarray(values, np.float64))
    return RIDGES[int(np.argmin(np.abs(alphas - fit.alpha_)))]


def ridge_coefficients(
    bits: np.ndarray, values: np.ndarray, ridge: float
) -> np.ndarray:
    """`w` of `min mean((v - w0 - bits @ w)^2) + ridge |w|^2`.

    The intercept is removed by centring; the penalty is added as
    `sqrt(ridge * samples) * I` rows, so `ridge = 0` is plain least squares
    (minimum-norm when singular).
    """
    x = bits.astype(np.float64)
    x = x - x.mean(axis=0)
    y = values.astype(np.float64) - values.mean()
    n = x.shape[1]
    if ridge > 0:
        x = np.concatenate([x, np.sqrt(ridge * len(y)) * np.eye(n)])
        y = np.concatenate([y, np.zeros(n)])
    return np.linalg.lstsq(x, y, rcond=None)[0]


def _metric_fn(model, metric):
    checks.choice("metric", metric, METRICS)
    if metric == "accuracy":
        return _accuracy
    loss = getattr(model, "loss", None)
    if loss is None or isinstance(loss, (dict, list, tuple)):
        raise ValueError(
            '`metric="loss"` uses the model\'s compiled loss: compile the '
            'model with one loss, or use `metric="accuracy"`. '
            f"Received: model.loss={loss!r}"
        )
    fn = keras.losses.get(loss)
    return lambda y, y_pred: ops.mean(fn(y, y_pred))


def _accuracy(y, y_pred):
    pred = ops.argmax(y_pred, axis=-1)
    if len(y.shape) == len(y_pred.shape) and y.shape[-1] != 1:
        label = ops.argmax(y, axis=-1)
    else:
        label = ops.reshape(y, ops.shape(pred))
    hit = ops.equal(ops.cast(label, "int64"), ops.cast(pred, "int64"))
    return ops.mean(ops.cast(hit, "float32"))


def _masked_consumers(model, an, groups, offsets):
    """`(variable, original, gather index, mask shape)` of every consumer.

    The gather index maps every entry of the consumer's input axis to its
    bit in the mask vector (extended by a final 1 for entries of frozen
    groups).
    """
    start = {an.gid_of[g.name]: int(offsets[k]) for k, g in enumerate(groups)}
    out = []
    for e, gids, chans in an.consumer_maps():
        index = np.full(len(gids), offsets[-1], dtype=np.int64)
        for gid, first in start.items():
            index[gids == gid] = first + chans[gids == gid]
        if np.all(index == offsets[-1]):
            continue
        variable = graph.get_variable(model, e.path)
        shape = [1] * len(variable.shape)
        shape[e.axis] = len(index)
        original = tf.constant(variable.numpy())
        out.append((variable, original, tf.constant(index), shape))
    return out


def _compiled_evaluation(model, data, masked, metric_fn):
    """A `tf.function(bits) -> metric on data` with the mask applied.

    The batches are slices of in-memory tensors in a `tf.range` loop: a
    `tf.data` loop inside the function would cost a new iterator per call.
    """
    x_all, y_all, batch = (tf.constant(data[0]), tf.constant(data[1]),
                           data[2])
    steps = -(-len(data[0]) // batch)

    @tf.function
    def evaluate(bits):
        ext = tf.concat([bits, tf.ones([1], bits.dtype)], axis=0)
        for variable, original, index, shape in masked:
            mask = tf.reshape(tf.gather(ext, index), shape)
            variable.assign(original * tf.cast(mask, original.dtype))
        total = tf.constant(0.0, tf.float64)
        count = tf.constant(0.0, tf.float64)
        for i in tf.range(steps):
            x = x_all[i * batch : (i + 1) * batch]
            y = y_all[i * batch : (i + 1) * batch]
            n = tf.cast(tf.shape(y)[0], tf.float64)
            value = metric_fn(y, model(x, training=False))
            total += tf.cast(value, tf.float64) * n
            count += n
        return total / count

    return evaluate
