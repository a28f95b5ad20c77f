"""Times GSM's global top-Q selection candidates on ResNet-56-sized scores.

Candidates find the threshold `t` such that `scores >= t` keeps the Q
largest of `n` non-negative scores: `tf.math.top_k`, `tf.sort`, a bisection
on counts over [0, max] in float (40 rounds, approximate) and the bisection
over the float bit patterns that GSM uses (`top_q_threshold`, exact). Each is
timed as a `tf.function`, with and without XLA; `kept` is the number of
scores kept (exactly Q is required). The bit-pattern bisection is timed as a
`tf.while_loop` and unrolled (31 rounds, GSM's choice).

    python benchmarks/gsm_selection.py [--n 855770] [--density 0.1]

Writes benchmarks/results/gsm_selection.json.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import tensorflow as tf

from keras_csgd.latency import timing
from keras_csgd.sparsity import top_q_threshold

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def top_k_threshold(scores, q):
    return tf.reduce_min(tf.math.top_k(scores, k=q, sorted=False).values)


def sort_threshold(scores, q):
    return tf.sort(scores, direction="DESCENDING")[q - 1]


def float_bisection_threshold(scores, q, rounds=40):
    lo = tf.constant(0.0)
    hi = tf.reduce_max(scores)
    for _ in range(rounds):
        mid = (lo + hi) / 2
        enough = tf.reduce_sum(tf.cast(scores >= mid, tf.int32)) >= q
        lo, hi = tf.where(enough, mid, lo), tf.where(enough, hi, mid)
    return lo


def while_bisection_threshold(scores, q):
    bits = tf.bitcast(scores, tf.int32)

    def bisect(lo, hi):
        mid = lo + (hi - lo) // 2
        enough = tf.reduce_sum(tf.cast(bits >= mid, tf.int32)) >= q
        return tf.where(enough, mid, lo), tf.where(enough, hi, mid)

    lo, _ = tf.while_loop(
        lambda lo, hi: hi - lo > 1,
        bisect,
        (tf.constant(0, tf.int32), tf.reduce_max(bits) + 1),
    )
    return tf.bitcast(lo, tf.float32)


CANDIDATES = {
    "top_k": top_k_threshold,
    "sort": sort_threshold,
    "bisection_float_40": float_bisection_threshold,
    "bisection_bits_while_loop": while_bisection_threshold,
    "bisection_bits_unrolled (chosen)": top_q_threshold,
}


def time_ms(fn, scores, repeats):
    fn(scores).numpy()  # trace / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(scores).numpy()
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=855_770)  # ResNet-56 kernels
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w = rng.normal(size=args.n).astype(np.float32)
    g = rng.normal(size=args.n).astype(np.float32)
    scores = tf.constant(np.abs(w * g))
    q = int(args.n * args.density)
    rows = []
    for name, select in CANDIDATES.items():
        for xla in (False, True):
            fn = tf.function(lambda s, f=select: f(s, q), jit_compile=xla)
            kept = int(tf.reduce_sum(tf.cast(scores >= fn(scores), tf.int32)))
            ms = time_ms(fn, scores, args.repeats)
            rows.append({"method": name, "xla": xla, "ms": round(ms, 2),
                         "kept": kept, "exact": kept == q})
            print(f"{name:<34} xla={xla!s:<5} {ms:8.2f} ms  kept={kept} "
                  f"(Q={q})")
    # Exactness beyond the timed density: kept - Q for each candidate.
    excess = {}
    for density in (0.01, 0.5, 0.9, 0.99):
        qd = int(args.n * density)
        excess[str(density)] = {
            name: int(tf.reduce_sum(tf.cast(
                scores >= tf.function(select)(scores, qd), tf.int32))) - qd
            for name, select in CANDIDATES.items()
        }
    print("kept - Q at other densities:", excess)
    result = {
        "n": args.n,
        "density": args.density,
        "q": q,
        "repeats": args.repeats,
        "tensorflow": tf.__version__,
        "machine": {**timing.machine(), **timing.versions()},
        "cpus": os.cpu_count(),
        "rows": rows,
        "kept_minus_q": excess,
    }
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "gsm_selection.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
