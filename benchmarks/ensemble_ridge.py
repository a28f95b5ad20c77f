"""How reproducible filter-ensemble scores are, per ridge penalty and
mask keep probability.

    .venv/bin/python benchmarks/ensemble_ridge.py \\
        --data-dir ../shared/data/cifar10 [--runs 2] [--images 500] \\
        [--mask-keep 0.9 0.97 0.99]

The base model of `benchmarks/latency_methods.py` (a trained CIFAR ResNet-20,
448 prunable channels), scored by `kc.methods.ensemble_importance` as
`keras-csgd prune --method ensembles` does (512 masks, loss, on `--images`
training images), `--runs` times with other images and masks (seeds 0,
1, ...), for each `--mask-keep` (the probability that a mask keeps a
channel). The masks and their losses of each run are refitted at every
penalty of `keras_csgd.methods.ensembles.RIDGES` and at the one
`ridge="auto"` chooses (`chosen_ridge`). Per penalty: the mean over
groups of the Spearman correlation of a group's channel ranking between
two runs (how reproducible the scores are) and with the L1 filter norms.
With barely more masks than channels (512, 448) the fit is
ill-conditioned, and a nearly unpenalised one ranks channels almost at
random.

Writes `benchmarks/results/ensemble_ridge.json` with the machine.
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from cifar10 import command, dump_json, machine, write_atomically  # noqa: E402
from latency_methods import base_model, split  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd.methods import ensembles  # noqa: E402
from keras_csgd.recover import compile_classifier  # noqa: E402

ENSEMBLE_MASK_KEEP = inspect.signature(
    ensembles.ensemble_importance).parameters["mask_keep"].default

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT = os.path.join(HERE, "results", "ensemble_ridge.json")
SHOWN = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def fits(model, x, y, runs, images, mask_keep):
    """`(bits, losses)` of each run's masks: `ensemble_importance` with
    its fit intercepted."""
    captured, fit = [], ensembles.ridge_coefficients

    def keep(bits, values, ridge):
        captured.append((bits.copy(), values.copy()))
        return fit(bits, values, ridge)

    ensembles.ridge_coefficients = keep
    try:
        for seed in range(runs):
            pick = np.random.default_rng(seed).permutation(len(x))[:images]
            ensembles.ensemble_importance(model, (x[pick], y[pick]),
                                          seed=seed, mask_keep=mask_keep,
                                          verbose=0)
    finally:
        ensembles.ridge_coefficients = fit
    return captured


def mean_rank_correlation(a, b, offsets) -> float:
    return float(np.mean([
        spearmanr(a[i:j], b[i:j]).statistic
        for i, j in zip(offsets[:-1], offsets[1:])
    ]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--mask-keep", type=float, nargs="+",
                        default=[ENSEMBLE_MASK_KEEP],
                        help="mask keep probabilities (default: the "
                        "library's)")
    args = parser.parse_args(argv)
    (xt, yt), val = split(args.data_dir)
    model, _ = base_model((xt, yt), val)
    compile_classifier(model, "sgd")
    groups = [g for g in kc.channel_groups(model) if g.prunable]
    offsets = np.cumsum([0] + [g.size for g in groups])
    l1 = np.concatenate([kc.methods.magnitude.filter_norms(model, g, "l1")
                         for g in groups])
    rows, losses = [], {}
    for mask_keep in args.mask_keep:
        runs = fits(model, xt[:10000], yt[:10000], args.runs, args.images,
                    mask_keep)
        losses[mask_keep] = [[float(v.min()), float(v.max())]
                             for _, v in runs]
        chosen = [ensembles.chosen_ridge(b, v) for b, v in runs]
        for ridge in sorted(set(SHOWN) | set(chosen)):
            scores = [-ensembles.ridge_coefficients(b, v, ridge)
                      for b, v in runs]
            rows.append({
                "mask_keep": mask_keep, "ridge": ridge,
                "chosen_by_auto_in_runs": [k for k, c in enumerate(chosen)
                                           if c == ridge],
                "between_runs": float(np.mean([
                    mean_rank_correlation(a, b, offsets)
                    for a, b in itertools.combinations(scores, 2)])),
                "with_l1_norms": float(np.mean([
                    mean_rank_correlation(s, l1, offsets) for s in scores])),
            })
            print(rows[-1], flush=True)
    result = {
        "command": command("ensemble_ridge.py", argv),
        "machine": machine(), "channels": int(offsets[-1]),
        "masks": len(runs[0][1]), "images": args.images,
        "loss_range": losses,
        "rows": rows,
    }
    write_atomically(RESULT, lambda tmp: dump_json(result, tmp))


if __name__ == "__main__":
    main()
