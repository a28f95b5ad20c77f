"""Times a training step with C-SGD (and GSM) against keras SGD.

CIFAR ResNet-56 (`kc.models.resnet_cifar(56)`), one fixed random batch of
64 images, `keras.optimizers.SGD(momentum=0.9, nesterov=True)` as the
baseline, all optimizers measured in the same run, round-robin (every round
times each optimizer in turn, starting with a different one each round;
the medians over rounds of the times and of the per-round ratios to SGD
are reported, with the range of the ratios, and each optimizer's fastest
block, the one other processes on a shared machine disturbed least, with
its ratio to SGD's fastest block):

- `train_step_ms`: `model.train_on_batch` (forward, backward, update);
- `apply_ms`: `optimizer.apply_gradients` alone on fixed gradients, inside a
  `tf.function`.

`--xla` modes: "on" compiles the model (`jit_compile=True`) and the
optimizers' update functions; "off" compiles neither (CSGD and GSM with
`jit_compile=False`); "update" compiles only the update functions (the
optimizers' default), in a model without XLA (what Keras's
`jit_compile="auto"` gives on a machine without a GPU).

    python benchmarks/optimizer_overhead.py [--optimizers sgd,csgd,gsm]
        [--depth 56] [--batch 64] [--steps 50] [--rounds 5]
        [--xla on,off,update]

Prints the ratios to SGD and writes
benchmarks/results/optimizer_overhead.json.
"""

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf
from cifar10 import machine

import keras_csgd as kc
from keras_csgd.models import resnet_cifar

RESULTS = os.path.join(os.path.dirname(__file__), "results")


MODES = {"on": (True, True), "off": (False, False), "update": (False, True)}


def make_optimizer(name, model, xla):
    """The optimizer `name` ("sgd", "csgd" or "gsm") for `model`."""
    if name == "sgd":
        return keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    if name == "csgd":
        plan = kc.make_plan(model, keep=0.625)
        return kc.CSGD(plan, learning_rate=0.01, jit_compile=xla)
    if name == "gsm":
        return kc.GSM(density=0.1, learning_rate=0.01, jit_compile=xla)
    raise ValueError(
        '`--optimizers` entries must be "sgd", "csgd" or "gsm". '
        f"Received: {name!r}"
    )


def setups(names, args, model_xla, update_xla):
    """One compiled model and a timed step function per optimizer."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, args.batch)
    out = {}
    for name in names:
        keras.utils.set_random_seed(0)
        model = resnet_cifar(args.depth)
        opt = make_optimizer(name, model, update_xla)
        model.compile(
            optimizer=opt, loss="sparse_categorical_crossentropy",
            jit_compile=model_xla,
        )
        variables = model.trainable_variables
        grads = [
            tf.constant(rng.normal(0, 1e-3, v.shape).astype("float32"))
            for v in variables
        ]
        opt.build(variables)
        out[name] = {
            "train_step_ms": train_loop(model, x, y),
            "apply_ms": apply_loop(opt, grads, variables, model_xla),
        }
        for fn in out[name].values():
            fn(3)
    return out


def train_loop(model, x, y):
    def train(steps):
        for _ in range(steps):
            model.train_on_batch(x, y)

    return train


def apply_loop(opt, grads, variables, xla):
    @tf.function(jit_compile=xla)
    def apply():
        opt.apply_gradients(zip(grads, variables))
        return opt.iterations

    def update(steps):
        for _ in range(steps):
            it = apply()
        it.numpy()

    return update


def timed(fn, steps):
    start = time.perf_counter()
    fn(steps)
    return 1000 * (time.perf_counter() - start) / steps


def run(names, args, model_xla, update_xla):
    fns = setups(names, args, model_xla, update_xla)
    kinds = ("train_step_ms", "apply_ms")
    samples = {k: {n: [] for n in names} for k in kinds}
    ratios = {k: {n: [] for n in names} for k in kinds}
    for r in range(args.rounds):
        # Each round starts with a different optimizer, so that no one of
        # them is always timed first (or last).
        order = names[r % len(names):] + names[: r % len(names)]
        for kind in kinds:
            times = {name: timed(fns[name][kind], args.steps) for name in order}
            for name in names:
                samples[kind][name].append(times[name])
                ratios[kind][name].append(times[name] / times["sgd"])
    result = {
        kind: {n: statistics.median(v) for n, v in per.items()}
        for kind, per in samples.items()
    }
    result["ratio_to_sgd"] = {
        kind: {n: statistics.median(v) for n, v in per.items()}
        for kind, per in ratios.items()
    }
    result["fastest_block_ms"] = {
        kind: {n: min(v) for n, v in per.items()}
        for kind, per in samples.items()
    }
    result["ratio_of_fastest"] = {
        kind: {n: min(v) / min(per["sgd"]) for n, v in per.items()}
        for kind, per in samples.items()
    }
    result["ratio_range"] = {
        kind: {n: [min(v), max(v)] for n, v in per.items()}
        for kind, per in ratios.items()
    }
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizers", default="sgd,csgd,gsm")
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--xla", default="on,off,update")
    parser.add_argument(
        "--output", default=os.path.join(RESULTS, "optimizer_overhead.json")
    )
    args = parser.parse_args()
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    if "sgd" not in names:
        names.insert(0, "sgd")
    report = {
        "command": "python benchmarks/optimizer_overhead.py "
        f"--optimizers {','.join(names)} --depth {args.depth} "
        f"--batch {args.batch} --steps {args.steps} --rounds {args.rounds} "
        f"--xla {args.xla}",
        "machine": machine(),
        "results": {},
    }
    for mode in [m.strip() for m in args.xla.split(",") if m.strip()]:
        if mode not in MODES:
            raise ValueError(
                f'`--xla` entries must be "on", "off" or "update". '
                f"Received: {mode!r}"
            )
        result = run(names, args, *MODES[mode])
        report["results"][f"xla_{mode}"] = result
        for kind in ("train_step_ms", "apply_ms"):
            line = ", ".join(
                f"{n} {result[kind][n]:.2f} ms "
                f"(x{result['ratio_to_sgd'][kind][n]:.3f}; fastest "
                f"x{result['ratio_of_fastest'][kind][n]:.3f})"
                for n in names
            )
            print(f"XLA {mode:6s} {kind:13s}: {line}")
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
