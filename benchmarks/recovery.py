"""What each part of `kc.fine_tune` adds to recovery after pruning.

    .venv/bin/python benchmarks/recovery.py --data-dir ../shared/data/cifar10

A CIFAR ResNet-20 base trained briefly on 10,000 CIFAR-10 training images
(inputs in [0, 1]; `cifar10.base_model`: Nesterov SGD, cosine lr from 0.1,
flip/crop augmentation, `--base-epochs`; cached under `benchmarks/cache/`)
is pruned by magnitude (`kc.methods.magnitude_plan(base, keep=0.5)`, L1
filter norms) and slimmed; each variant fine-tunes a fresh copy of that
slim model for `--epochs` epochs on the same 10,000 images, adding one part
at a time:

1. labels only, constant learning rate 0.01 (what `keras-csgd prune
   --epochs` did before `kc.fine_tune`);
2. + cosine decay of the learning rate;
3. + random flip and pad-4 random crop;
4. + distillation from the base (KL divergence of the tempered softmax,
   `--temperature`, `--alpha`);
5. cosine and distillation without flip/crop.

At lr 0.01, T 4, alpha 0.5 unless `--learning-rate`, `--temperature` or
`--alpha` say otherwise; `kc.fine_tune`'s defaults are what this measured
best (README, "Recovery after pruning").

Accuracies are on 5,000 validation images held out of the training folder
(the last of a fixed shuffle, seed 0; `cifar10.load_data`). Writes
`benchmarks/results/recovery_quick_s<seed>.json` (other settings than the
defaults named before `_s`, e.g. `recovery_quick_a0.9_s0.json`; or
`--out`) with the machine, after every variant; variants already in that
file with the same settings are kept, so `--variants` adds to it
(`commands` lists each run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from cifar10 import (  # noqa: E402
    PROFILES,
    base_model,
    command,
    dump_json,
    load_data,
    machine,
    write_atomically,
)

import keras_csgd as kc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
KEEP = 0.5
# The ablation's settings (files with others are named by them): the lr of
# `prune --epochs` before `kc.fine_tune`, common distillation settings.
LEARNING_RATE, TEMPERATURE, ALPHA, EPOCHS = 0.01, 4.0, 0.5, 3
# Each variant adds its part to the one before.
VARIANTS = {
    "labels, constant lr": {"schedule": "constant", "augment": False},
    "+ cosine lr": {"augment": False},
    "+ flip/crop": {"augment": True},
    "+ distillation": {"augment": True, "distil": True},
    "cosine + distillation, no flip/crop": {"augment": False,
                                            "distil": True},
}


def base_and_data(args):
    """The base model and its data: `(base, info, data)`.

    `data` holds `--train-size` training images and 5,000 validation
    images; the images enter the model in [0, 1] (no normalisation), as in
    a model a user hands to `keras-csgd prune`.
    """
    profile = dataclasses.replace(
        PROFILES["quick"], train_size=args.train_size,
        base_epochs=args.base_epochs, jit_compile=False,
    )
    base_args = argparse.Namespace(
        model="resnet20", profile=f"recovery{args.train_size}",
        data_dir=args.data_dir, test_dir=None, seed=0, base_seed=0,
    )
    keras.utils.set_random_seed(0)
    data = load_data(base_args, profile, args.cache_dir)
    data = dataclasses.replace(data, mean=np.zeros(3, np.float32),
                               std=np.ones(3, np.float32))
    base, info = base_model(base_args, profile, data, args.cache_dir)
    return base, info, data


def settings_suffix(args) -> str:
    """`_a0.9_t2` etc. for the settings that differ from the defaults."""
    return "".join(
        f"_{key}{value:g}" for key, value, default in (
            ("a", args.alpha, ALPHA),
            ("t", args.temperature, TEMPERATURE),
            ("lr", args.learning_rate, LEARNING_RATE),
            ("e", args.epochs, EPOCHS),
        ) if value != default
    )


def unit(x):
    return x.astype(np.float32) / 255.0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--train-size", type=int, default=10000)
    parser.add_argument("--base-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--temperature", type=float, default=TEMPERATURE)
    parser.add_argument("--alpha", type=float, default=ALPHA)
    parser.add_argument("--learning-rate", type=float, default=LEARNING_RATE)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                        default=list(VARIANTS))
    parser.add_argument("--cache-dir", default=os.path.join(HERE, "cache"))
    parser.add_argument("--seed", type=int, default=0,
                        help="fine-tuning seed (shuffle, augmentation)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join(
        HERE, "results", f"recovery_quick{settings_suffix(args)}"
        f"_s{args.seed}.json")
    result = {"commands": [command("recovery.py", argv)],
              "machine": machine()}
    base, info, data = base_and_data(args)
    train = (unit(data.x_train), data.y_train)
    val = (unit(data.x_val), data.y_val)
    plan = kc.methods.magnitude_plan(base, keep=KEEP)
    result.update({
        "base": {"val_accuracy": info["accuracy"],
                 "epochs": args.base_epochs, "cached": info["cached"]},
        "data": {"train_images": len(train[0]),
                 "val_images": len(val[0]),
                 "validation": "last 5000 of a fixed shuffle (seed 0) of "
                 "the training folder"},
        "pruning": {"method": "magnitude (L1)", "keep": KEEP,
                    "macs_ratio": kc.macs_under(base, plan)
                    / kc.count_macs(base)},
        "settings": {"epochs": args.epochs,
                     "learning_rate": args.learning_rate,
                     "temperature": args.temperature, "alpha": args.alpha,
                     "batch_size": 64, "seed": args.seed},
        "variants": {},
    })
    if os.path.isfile(args.out):
        with open(args.out) as f:
            previous = json.load(f)
        if previous["settings"] == result["settings"]:
            result["commands"] = previous["commands"] + result["commands"]
            result["variants"] = previous["variants"]
    for name in args.variants:
        options = dict(VARIANTS[name])
        teacher = base if options.pop("distil", False) else None
        keras.utils.set_random_seed(args.seed)
        report = kc.fine_tune(
            kc.slim(base, plan), train, teacher=teacher,
            validation_data=val, epochs=args.epochs,
            learning_rate=args.learning_rate,
            temperature=args.temperature, alpha=args.alpha, seed=args.seed,
            verbose=2, **options,
        )
        result["variants"][name] = report.as_dict()
        write_atomically(args.out, lambda tmp: dump_json(result, tmp))
        print(f"{name}: {report}", flush=True)
    return result


if __name__ == "__main__":
    main()
