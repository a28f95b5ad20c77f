"""C-SGD's short-schedule settings on a trained model, by measurement.

    .venv/bin/python benchmarks/csgd_settings.py \\
        --data-dir ../shared/data/cifar10 [--epochs 3] [--images 10000]

The base model of `benchmarks/latency_methods.py` (a CIFAR ResNet-20 that
takes `[0, 1]` images, 15 epochs on the quick profile), the plan issue #22
reports `plan_for_latency` making at 0.5 of its LiteRT batch-1 latency
(the three stage-1 blocks removed, the stage-2 stream narrowed to half;
k-means clusters), fixed here so that the comparison does not depend on
this machine's timings, and `--epochs` epochs on the first `--images`
training images, every variant evaluated on the 5k held-out images:

- `magnitude`: the plan's widths with the best L1 channels, then
  `kc.fine_tune` (distilled from the base, cosine lr, flip/crop): the
  recovery C-SGD has to match.
- `csgd_constant`: the command line's C-SGD until now (constant lr 0.03,
  centripetal strength 0.3, no augmentation, labels only).
- `csgd_recipe_*`: C-SGD trained by `kc.fine_tune`'s recipe (its
  `optimizer=` hook: cosine lr, flip/crop, distillation from the base),
  with a peak lr and a centripetal strength that collapse the clusters
  within the schedule (`exp(-eps * sum(lr) / (1 - momentum))`).

Writes `benchmarks/results/csgd_settings_quick.json` (with the machine)
after every variant.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from cifar10 import command, dump_json, machine, write_atomically  # noqa: E402
from latency_methods import accuracy, base_model, split  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd.scoring import top_channels  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULT = os.path.join(HERE, "results", "csgd_settings_quick.json")
VARIANTS = {
    "csgd_recipe_lr0.03_eps0.3": (0.03, 0.3),
    "csgd_recipe_lr0.01_eps1": (0.01, 1.0),
}


def copy_of(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def agreement(trained, slim, x):
    a = trained.predict(x, batch_size=250, verbose=0)
    b = slim.predict(x, batch_size=250, verbose=0)
    return {
        "argmax_agreement": float(np.mean(a.argmax(-1) == b.argmax(-1))),
        "max_logit_difference_relative": float(
            np.abs(a - b).max() / np.abs(a).max()),
    }


def run_csgd(base, plan, train, val, epochs, lr, eps, recipe):
    model = copy_of(base)
    settings = dict(momentum=0.9, centripetal_strength=eps,
                    vector_strength_scale=1.0, weight_decay=1e-4)
    if recipe:
        kc.fine_tune(model, train, teacher=base, epochs=epochs,
                     validation_data=val, learning_rate=lr, verbose=2,
                     optimizer=lambda rate: kc.CSGD(
                         plan, learning_rate=rate, **settings))
    else:
        kc.recover.compile_classifier(
            model, kc.CSGD(plan, learning_rate=lr, **settings))
        model.fit(*train, batch_size=64, epochs=epochs, verbose=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slim = kc.slim(model, plan, inputs=val[0][:256])
    return {
        "trained_accuracy_val": accuracy(model, *val),
        "slim_accuracy_val": accuracy(slim, *val),
        "cluster_spread": kc.cluster_spread(model, plan)["overall"],
        "slim_warnings": [str(w.message)[:200] for w in caught],
        **agreement(model, slim, val[0]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=10000)
    args = parser.parse_args(argv)
    (xt, yt), val = split(args.data_dir)
    train = (xt[: args.images], yt[: args.images])
    base, _ = base_model((xt, yt), val)
    groups = kc.channel_groups(base)
    stream = next(g.name for g in groups
                  if any(m[0] == "s2b1_proj_conv" for m in g.members))
    plan = kc.PruningPlan(
        kc.make_plan(base, keep={stream: 0.5}, method="kmeans").clusters,
        groups=groups, remove_blocks=["s1b1_add", "s1b2_add", "s1b3_add"],
    ).bind_blocks(base)
    result = {
        "command": command("csgd_settings.py", argv),
        "machine": machine(),
        "base_accuracy_val": accuracy(base, *val),
        "plan": {"widths": plan.widths(),
                 "remove_blocks": list(plan.remove_blocks),
                 "macs_ratio": kc.macs_under(base, plan) / kc.count_macs(
                     base)},
        "epochs": args.epochs, "images": args.images,
        "val_images": len(val[0]), "variants": {},
    }

    def record(name, row, start):
        row["seconds"] = round(time.perf_counter() - start, 1)
        result["variants"][name] = row
        print(name, row, flush=True)
        write_atomically(RESULT, lambda tmp: dump_json(result, tmp))

    start = time.perf_counter()
    by_name = {g.name: g for g in groups}
    chosen = {
        n: top_channels(kc.methods.magnitude.filter_norms(
            base, by_name[n], "l1"), len(c))
        for n, c in plan.clusters.items()
    }
    magnitude = kc.PruningPlan(chosen, groups=groups,
                               remove_blocks=plan.remove_blocks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = kc.slim(base, magnitude)
    tuned = kc.fine_tune(slim, train, teacher=base, epochs=args.epochs,
                         validation_data=val, verbose=2)
    record("magnitude", {"slim_accuracy_val": tuned.accuracy_after,
                         "before_fine_tuning": tuned.accuracy_before},
           start)
    start = time.perf_counter()
    record("csgd_constant",
           run_csgd(base, plan, train, val, args.epochs, 0.03, 0.3, False),
           start)
    for name, (lr, eps) in VARIANTS.items():
        start = time.perf_counter()
        record(name, run_csgd(base, plan, train, val, args.epochs, lr, eps,
                              True), start)


if __name__ == "__main__":
    main()
