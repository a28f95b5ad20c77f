"""Every `--latency` method on a trained model, run as a user runs it.

    .venv/bin/python benchmarks/latency_methods.py \\
        --data-dir ../shared/data/cifar10 [--targets 0.5 0.35] \\
        [--seeds 0 1] [--methods magnitude csgd ...]

Issue #22's benchmark. A CIFAR ResNet-20 that takes images in `[0, 1]`
(a `Normalization` layer first, as a model trained elsewhere would have)
is trained once on the quick profile of `benchmarks/cifar10.py` (20k
training images, 15 epochs, cosine lr, flip/crop; the last 5k of a fixed
shuffle of the 50k held out for validation) and cached under
`benchmarks/cache/`. Then, for every target, method and seed, the
README's flagship command runs in its own process on the first 10k
training images:

    keras-csgd prune base.keras --method M --latency T --runtime litert \\
        --batch-size 1 --data train10k.npz --epochs 3 --out slim.keras

and the slim model it wrote is evaluated on the 5k held-out images (which
the command never sees; it holds out its own validation split of the 10k).
The base is profiled once first (`keras-csgd profile`, cached), so every
method plans from the same latency table. Run it on a quiet machine: on
a busy one the table and the verification timings are noise, and the
methods' plans differ for that reason alone.
Each row records the command's printed output (latency measured by the
command, its accuracies), the held-out accuracy of the base, of the
trained model where the method trains one, and of the slim model.
Each slim model is also exported as float32 and full-integer int8
LiteRT (`kc.export`, int8 calibrated on the first 100 training images)
and its held-out accuracy measured in the interpreter (issue #25: int8
within 1 point of float); `--rescore` adds these to the rows of an
existing `--out` that lack them, from the slim files the runs wrote.
`--table A.json B.json ...` prints the README's table of the rows of
several runs (the last row of each method, target and seed wins).
Writes `benchmarks/results/latency_methods_quick.json` after every run,
with the machine (CPU model, SIMD flags, load).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from cifar10 import (  # noqa: E402
    command,
    dump_json,
    machine,
    runtime_accuracy,
    write_atomically,
)

import keras_csgd as kc  # noqa: E402
from keras_csgd import data as kdata  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "cache")
RESULT = os.path.join(HERE, "results", "latency_methods_quick.json")
METHODS = ("magnitude", "csgd", "asfp", "cap", "ensembles", "adaptive")
BASE_IMAGES, BASE_EPOCHS, VAL_IMAGES, BATCH = 20000, 15, 5000, 64


def split(data_dir):
    """`(x_train, y_train), (x_val, y_val)` in `[0, 1]`, float32."""
    x, y = kdata.load_cifar10(data_dir, cache_dir=os.path.join(CACHE,
                                                               "images"))
    (xt, yt), (xv, yv) = kdata.train_val_split(x, y, VAL_IMAGES, seed=0)
    return (xt.astype("float32") / 255, yt), (xv.astype("float32") / 255, yv)


def accuracy(model, x, y) -> float:
    logits = model.predict(x, batch_size=250, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


def base_model(train, val):
    """The cached base ResNet-20 (inputs in [0, 1]), trained if missing."""
    path = os.path.join(CACHE, "resnet20_normalized_quick.keras")
    if os.path.isfile(path):
        return keras.saving.load_model(path, compile=False), path
    x, y = train[0][:BASE_IMAGES], train[1][:BASE_IMAGES]
    mean, std = kdata.channel_stats(x)
    model = kc.models.resnet_cifar(20, mean=mean, std=std)
    steps = BASE_EPOCHS * int(np.ceil(len(x) / BATCH))
    optimizer = keras.optimizers.SGD(
        keras.optimizers.schedules.CosineDecay(0.1, steps), momentum=0.9,
        nesterov=True, weight_decay=5e-4,
    )
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    model.compile(
        optimizer,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        kdata.make_dataset(x, y, BATCH, shuffle=True, augment=True),
        epochs=BASE_EPOCHS, validation_data=val, verbose=2,
    )
    os.makedirs(CACHE, exist_ok=True)
    write_atomically(path, model.save)
    return model, path


def runtime_accuracies(slim, train, val) -> dict:
    """`{format: held-out accuracy}` of `slim` exported as float32 and as
    full-integer int8 LiteRT (calibrated on 100 training images), one
    image per call."""
    return {fmt: runtime_accuracy(slim, fmt, train[0][:100],
                                  ((x[None], y[None]) for x, y in zip(*val)))
            for fmt in ("litert", "litert-int8")}


def rescore(path, train, val):
    """Adds `runtime_accuracies` to the rows of the JSON at `path`."""
    with open(path) as f:
        result = json.load(f)
    for row in result["rows"]:
        out = row["command"].split("--out ")[-1].split()[0]
        if "runtime_accuracy_val" in row or not os.path.isfile(out):
            continue
        slim = keras.saving.load_model(out, compile=False)
        row["runtime_accuracy_val"] = runtime_accuracies(slim, train, val)
        print(row["method"], row["target"], row["seed"],
              row["runtime_accuracy_val"], flush=True)
        write_atomically(path, lambda tmp: dump_json(result, tmp))


def table(paths) -> str:
    """The markdown table of the rows in the JSONs at `paths`: per target
    and method, the held-out accuracy of every seed, their mean and the
    int8 - float LiteRT difference, the measured latency and MACs."""
    rows = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                if "slim_accuracy_val" in row:
                    rows[row["target"], row["method"], row["seed"]] = row
    lines = ["| target | method | held-out accuracy per seed | mean | "
             "int8 - float (LiteRT) | latency measured by the command | "
             "MACs |", "|---|---|---|---|---|---|---|"]
    for target, method in sorted({k[:2] for k in rows},
                                 key=lambda k: (-k[0], METHODS.index(k[1]))):
        runs = [rows[k] for k in sorted(rows) if k[:2] == (target, method)]
        accuracy = [r["slim_accuracy_val"] for r in runs]
        int8 = [r["runtime_accuracy_val"]["litert-int8"]
                - r["runtime_accuracy_val"]["litert"]
                for r in runs if "runtime_accuracy_val" in r]
        cells = [
            f"{target:g}", method,
            " / ".join(f"{a:.2%} (s{r['seed']})"
                       for a, r in zip(accuracy, runs)),
            f"{np.mean(accuracy):.2%}",
            " / ".join(f"{d:+.2%}" for d in int8) or "-",
            " / ".join("-" if r["measured_ratio"] is None
                       else f"{r['measured_ratio']:.3f}" for r in runs),
            " / ".join(f"{r['macs_ratio']:.2f}x" for r in runs),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_file(train, images):
    """The `--data` file of the runs: the first `images` training images."""
    path = os.path.join(CACHE, f"train{images // 1000}k.npz")
    if not os.path.isfile(path):
        np.savez(path, x=train[0][:images], y=train[1][:images])
    return path


def run_cli(args, method, target, seed, base_path, data_path):
    """Runs `keras-csgd prune` alone; returns its output and slim path."""
    out = os.path.join(CACHE, f"slim_{method}_{target:g}_s{seed}.keras")
    planned = (["--plan", args.plan] if args.plan and method != "adaptive"
               else ["--latency", f"{target:g}"])
    cli = [
        sys.executable, "-m", "keras_csgd.cli", "prune", base_path,
        "--method", method, *planned, "--runtime", "litert",
        "--batch-size", "1", "--data", data_path, "--epochs",
        str(args.epochs), "--seed", str(seed), "--out", out,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cli, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    return {
        "command": " ".join(cli[2:]),
        "returncode": proc.returncode,
        "stdout": proc.stdout.strip().splitlines(),
        "stderr_tail": proc.stderr.strip().splitlines()[-5:],
        "seconds": round(seconds, 1),
    }, out


def measured_ratio(lines) -> float | None:
    """The slim/full latency ratio the command printed."""
    for line in lines:
        found = re.search(r"slim [\d.]+ ms \(([\d.]+)%", line)
        if found:
            return float(found.group(1)) / 100
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir",
                        help="CIFAR-10 folder (see data.load_cifar10)")
    parser.add_argument("--targets", type=float, nargs="+",
                        default=[0.5, 0.35])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=list(METHODS))
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=RESULT, help="result JSON")
    parser.add_argument("--base-only", action="store_true",
                        help="train (or load) the base model and stop")
    parser.add_argument("--plan", help="a plan JSON (e.g. the magnitude "
                        "run's at the one --targets) that every method but "
                        "adaptive carries out (`prune --plan`) instead of "
                        "planning to the target itself: equal plans on a "
                        "busy machine, whose timings would make each "
                        "method's plan differ")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print the table of these results and stop")
    parser.add_argument("--rescore", action="store_true",
                        help="add the LiteRT float/int8 accuracies to the "
                        "rows of --out and stop")
    args = parser.parse_args(argv)
    if args.table:
        return print(table(args.table))
    if args.data_dir is None:
        parser.error("--data-dir is required")
    train, val = split(args.data_dir)
    if args.rescore:
        return rescore(args.out, train, val)
    base, base_path = base_model(train, val)
    result = {
        "command": command("latency_methods.py", argv),
        "machine": machine(),
        "base": {"accuracy_val": accuracy(base, *val),
                 "train_images": BASE_IMAGES, "epochs": BASE_EPOCHS},
        "val_images": VAL_IMAGES,
        "run_images": args.images,
        "epochs": args.epochs,
        "rows": [],
    }
    print(f"base: {result['base']['accuracy_val']:.4f} on {VAL_IMAGES} "
          "held-out images", flush=True)
    if args.base_only:
        return
    data_path = train_file(train, args.images)
    profile = subprocess.run(
        [sys.executable, "-m", "keras_csgd.cli", "profile", base_path,
         "--runtime", "litert", "--batch-size", "1"],
        capture_output=True, text=True,
    )
    result["profile"] = profile.stdout.strip().splitlines()[:3]
    for target in args.targets:
        for seed in args.seeds:
            for method in args.methods:
                row, out = run_cli(args, method, target, seed, base_path,
                                   data_path)
                row.update(method=method, target=target, seed=seed)
                if row["returncode"] == 0:
                    slim = keras.saving.load_model(out, compile=False)
                    row["slim_accuracy_val"] = accuracy(slim, *val)
                    row["measured_ratio"] = measured_ratio(row["stdout"])
                    row["macs_ratio"] = kc.count_macs(slim) / kc.count_macs(
                        base)
                    row["runtime_accuracy_val"] = runtime_accuracies(
                        slim, train, val)
                result["rows"].append(row)
                print(method, target, seed, row.get("slim_accuracy_val"),
                      row.get("measured_ratio"), row["seconds"], flush=True)
                write_atomically(args.out,
                                 lambda tmp: dump_json(result, tmp))


if __name__ == "__main__":
    main()
