"""Global unstructured sparsity: top-Q selection, final mask and report.

One global budget over all kernels (trainable weights of rank >= 2; biases
and normalization parameters are never masked): GSM selects its active
weights with `top_q_threshold` every step, and `sparsify` applies the final
magnitude mask with the same function.
"""

import numbers

import numpy as np
import tensorflow as tf


def is_kernel(variable) -> bool:
    """Whether `variable` is a kernel (rank >= 2) that sparsity applies to."""
    return len(variable.shape) >= 2


def check_density(density, name="density") -> float:
    """Returns `density` as a float after checking that it is in (0, 1].

    Args:
        density: the fraction of kernel weights to keep.
        name: the argument name used in the error message. Defaults to
            `"density"`.

    Returns:
        `float(density)`.

    Raises:
        ValueError: if `density` is not a number in (0, 1].
    """
    if (
        isinstance(density, bool)
        or not isinstance(density, numbers.Real)
        or not 0 < density <= 1
    ):
        raise ValueError(
            f"`{name}` must be a number in (0, 1]. Received: {name}={density!r}"
        )
    return float(density)


def top_q_threshold(scores, q):
    """The `q`-th largest of non-negative scores, found by bisection on counts.

    Non-negative float32 values order like their int32 bit patterns, so a
    bisection over the bit patterns in `[0, max]` ends after 31 counting
    passes on the exact `q`-th largest value (no tolerance, no sort).
    `scores >= threshold` then keeps exactly `q` entries when no other score
    equals the threshold; entries tied with it are all kept (ties can let a
    few more through, never fewer). `benchmarks/gsm_selection.py` compares
    this with `tf.math.top_k` and `tf.sort`.

    Args:
        scores: 1-D float32 tensor of finite non-negative scores with a
            static length `n`.
        q: Python int, how many to keep. `q <= 0` returns `inf` (keeps
            nothing finite), `q >= n` returns 0 (keeps everything).

    Returns:
        Scalar float32 tensor.
    """
    if q <= 0:
        return tf.constant(np.inf, tf.float32)
    if q >= scores.shape[0]:
        return tf.constant(0.0, tf.float32)
    bits = tf.bitcast(scores, tf.int32)
    # Invariant: count(bits >= lo) >= q > count(bits >= hi). The int32 range
    # of finite floats closes in 31 halvings; unrolled, XLA runs them faster
    # than a `tf.while_loop`.
    lo = tf.constant(0, tf.int32)
    hi = tf.reduce_max(bits) + 1
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        enough = tf.reduce_sum(tf.cast(bits >= mid, tf.int32)) >= q
        lo, hi = tf.where(enough, mid, lo), tf.where(enough, hi, mid)
    return tf.bitcast(lo, tf.float32)


def _kernels(model):
    return [v for v in model.trainable_weights if is_kernel(v)]


def sparsity_report(model, print_fn=print):
    """Per-kernel and global density (fraction of nonzero weights).

    Args:
        model: a built Keras model.
        print_fn: called with each line of a small table; `None` prints
            nothing. Defaults to `print`.

    Returns:
        `{"kernels": {path: {"size", "nonzero", "density"}}, "size",
        "nonzero", "density"}` over the model's trainable kernels (rank >= 2),
        keyed by variable path (`"dense/kernel"`), one entry per layer kernel.

    Example:

    ```python
    report = kc.sparsity_report(model)
    report["density"]  # e.g. 0.1
    ```
    """
    kernels = {}
    for variable in _kernels(model):
        size = int(np.prod(variable.shape))
        nonzero = int(np.count_nonzero(np.asarray(variable)))
        kernels[variable.path] = {
            "size": size,
            "nonzero": nonzero,
            "density": nonzero / size,
        }
    size = sum(k["size"] for k in kernels.values())
    nonzero = sum(k["nonzero"] for k in kernels.values())
    report = {
        "kernels": kernels,
        "size": size,
        "nonzero": nonzero,
        "density": nonzero / size if size else 1.0,
    }
    if print_fn is not None:
        width = max([len(p) for p in kernels] + [6])
        print_fn(f"{'kernel':<{width}} {'size':>10} {'nonzero':>10} density")
        for path, k in kernels.items():
            print_fn(
                f"{path:<{width}} {k['size']:>10} {k['nonzero']:>10} "
                f"{k['density']:.4f}"
            )
        print_fn(
            f"{'global':<{width}} {size:>10} {nonzero:>10} "
            f"{report['density']:.4f}"
        )
    return report


def sparsify(model, density):
    """Keeps the `Q = int(N * density)` largest `|w|` over all kernels.

    The final step of GSM (one global magnitude threshold, no fine-tuning):
    the `N` weights of all trainable kernels (rank >= 2) are ranked together,
    the `Q` largest in magnitude keep their values and all others are set to
    0, in place. Exactly `Q` survive when no magnitude ties the threshold
    (ties at the threshold are all kept). Per-layer sparsity follows from the
    global ranking.

    Args:
        model: a built Keras model.
        density: fraction of kernel weights to keep, in (0, 1].

    Returns:
        The `sparsity_report(model, print_fn=None)` after masking.

    Raises:
        ValueError: if `density` is not in (0, 1] or the model has no
            trainable kernel.

    Example:

    ```python
    report = kc.sparsify(model, density=0.1)
    report["kernels"]["dense/kernel"]["density"]
    ```

    References:
        Ding et al., Global Sparse Momentum SGD for Pruning Very Deep Neural
        Networks, NeurIPS 2019 (arXiv 1909.12778).
    """
    density = check_density(density)
    kernels = _kernels(model)
    if not kernels:
        raise ValueError(
            "`model` must have at least one trainable kernel (rank >= 2) to "
            f"sparsify. Received: model={model.name!r}"
        )
    magnitudes = [
        tf.abs(tf.cast(tf.convert_to_tensor(v), tf.float32)) for v in kernels
    ]
    scores = tf.concat([tf.reshape(m, [-1]) for m in magnitudes], 0)
    threshold = top_q_threshold(scores, int(scores.shape[0] * density))
    for variable, magnitude in zip(kernels, magnitudes):
        keep = tf.cast(magnitude >= threshold, variable.dtype)
        variable.assign(variable * keep)
    return sparsity_report(model, print_fn=None)
