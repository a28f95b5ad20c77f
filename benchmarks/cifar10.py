"""CIFAR-10 benchmark: every pruning method at the same MACs reduction.

    .venv/bin/python benchmarks/cifar10.py --model resnet20 --method csgd \\
        --profile quick --data-dir ../shared/data/cifar10 --seed 0

One base model per (model, profile, seed, data folder) is trained once and
cached under `benchmarks/cache/` (git-ignored); every method starts from it
(except `scratch`, the narrow network trained from random weights) and is
brought to the same width reduction (`--keep 0.625` of every prunable
channel group: 16/32/64 -> 10/20/40 channels, about 61% fewer MACs; the
measured ratio is reported). Accuracies are measured on a validation split
held out of the training folder (the last 5,000 images of a fixed shuffle,
seed 0, the same for every seed); `--test-dir` adds a separate labelled
folder. Each run writes
`benchmarks/results/<model>_<method>_<profile>_s<seed>.json`;
`benchmarks/make_tables.py` turns those into the tables, the plot and the
claims' verdicts. Profiles (see `PROFILES`): `quick` (about 40 minutes per
method on 2 CPU cores, ResNet-20), `full` (paper-scale budgets, for a GPU),
`smoke` (seconds, for the tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd import data as kdata  # noqa: E402
from keras_csgd import models  # noqa: E402
from keras_csgd.checks import fraction  # noqa: E402
from keras_csgd.clusters import target_width  # noqa: E402
from keras_csgd.methods import compensation  # noqa: E402
from keras_csgd.methods.adaptive import (  # noqa: E402
    AdaptiveGates,
    MacsTargetCallback,
)

HERE = os.path.dirname(os.path.abspath(__file__))
DEPTHS = {"resnet20": 20, "resnet56": 56}
MOMENTUM = 0.9
# C-SGD's coupled L2 (1e-4, inside the momentum) reaches the same steady
# state as Keras's decoupled decay `w -= lr * wd * w` with
# wd = 1e-4 / (1 - momentum); kernels only in both.
COUPLED_DECAY = 1e-4
SGD_DECAY = COUPLED_DECAY / (1 - MOMENTUM)
GSM_COMPRESSION = 10
# ASFP/SFP zero the BN gamma of BN-followed filters: zeroing the kernel
# (the papers' rule) made training collapse on this ResNet (BN epsilon
# 1e-5, coupled residual groups): 9.3% (ASFP) and 25.1% (SFP) after the
# quick profile, results of commits b08d04c and 6aa5260.
SOFT_PRUNING_BATCHNORM = "scale"
# Adaptive gates: penalty weight adjustments per epoch.
ADAPTIVE_ADJUSTMENTS = 10


@dataclasses.dataclass(frozen=True)
class Profile:
    """Budgets and hyperparameters of one benchmark profile.

    Attributes:
        train_size: training images used (the first of the shuffled training
            part), `None` for all.
        val_size: held-out validation images (the last of the shuffle; at
            most a fifth of a small folder).
        batch_size: training batch size.
        base_epochs: epochs of the base model (lr `base_lr`, cosine).
        epochs: epochs every method trains after the base model (C-SGD,
            ASFP/SFP, GSM and gate training, or fine-tuning the slim model),
            lr `lr` with cosine decay; `scratch` trains
            `base_epochs + epochs` from random weights.
        short_finetune: ASFP/SFP: extra fine-tuning epochs of the slim model,
            reported separately; adaptive: fine-tuning epochs when the gates
            never reached the MACs target (no lock).
        base_lr: peak learning rate from random weights.
        lr: peak learning rate after the base model (C-SGD's 3e-2).
        centripetal_strength: C-SGD `eps` of kernels.
        vector_strength_scale: C-SGD `eps` scale of BN gamma/beta.
        gsm_lr: GSM learning rate (reference 5e-3).
        gsm_momentum: GSM momentum (reference 0.98).
        adaptive_growth: adaptive gates: growth of the penalty weight per
            epoch while the MACs are above the target.
        gsm_weight_decay: GSM weight decay (reference 1e-4). The inactive
            weights shrink only through it, by about
            exp(-lr * wd * steps / (2 (1 - momentum))) over a cosine
            schedule, so a short profile needs a larger one.
        calib_size: training images (not augmented) that profile filters
            (functionality) and give CaP its statistics.
        ensemble_images: training images (not augmented) each random mask
            of the filter ensembles is scored on.
        ensemble_samples: random masks of the filter ensembles.
        jit_compile: XLA for training and inference.
    """

    train_size: int | None
    val_size: int
    batch_size: int
    base_epochs: int
    epochs: int
    short_finetune: int
    base_lr: float
    lr: float
    centripetal_strength: float
    vector_strength_scale: float
    gsm_lr: float
    gsm_momentum: float
    gsm_weight_decay: float
    adaptive_growth: float
    calib_size: int
    ensemble_images: int
    ensemble_samples: int
    jit_compile: bool


PROFILES = {
    # Seconds on a handful of images: checks the harness, not the methods.
    "smoke": Profile(
        train_size=256, val_size=256, batch_size=16, base_epochs=1,
        epochs=1, short_finetune=1, base_lr=0.1, lr=0.03,
        centripetal_strength=0.1, vector_strength_scale=1.0, gsm_lr=5e-3,
        gsm_momentum=0.98, gsm_weight_decay=2e-2, adaptive_growth=3.0,
        calib_size=32,
        ensemble_images=32,
        ensemble_samples=8,
        jit_compile=False,
    ),
    # About 40 minutes per method on 2 CPU cores (ResNet-20, XLA; about
    # 60-90 s per epoch of 20k images): 20k training images, 15 base epochs
    # (trained once), 6 epochs per method. C-SGD's pull is raised from 3e-3
    # to 0.1 (and to the full strength on BN) so that the clusters collapse
    # within 6 epochs: a cluster's spread shrinks by about
    # exp(-eps * lr * steps / (2 (1 - momentum))) = exp(-28) here. GSM's
    # weight decay is raised from 1e-4 to 2e-2 for the same reason: its
    # inactive weights shrink by exp(-4.7) instead of exp(-0.02).
    "quick": Profile(
        train_size=20000, val_size=5000, batch_size=64, base_epochs=15,
        epochs=6, short_finetune=1, base_lr=0.1, lr=0.03,
        centripetal_strength=0.1, vector_strength_scale=1.0, gsm_lr=5e-3,
        gsm_momentum=0.98, gsm_weight_decay=2e-2, adaptive_growth=3.0,
        calib_size=2000,
        ensemble_images=500,
        ensemble_samples=512,
        jit_compile=True,
    ),
    # Paper-scale budgets for a GPU: all 45k training images, 160 epochs
    # (He et al. 2016) for the base model and for every method, the C-SGD
    # reference hyperparameters (eps 3e-3, 0.1 on BN, lr 3e-2, batch 64)
    # and GSM's (lr 5e-3, momentum 0.98).
    "full": Profile(
        train_size=None, val_size=5000, batch_size=64, base_epochs=160,
        epochs=160, short_finetune=20, base_lr=0.1, lr=0.03,
        centripetal_strength=3e-3, vector_strength_scale=0.1, gsm_lr=5e-3,
        gsm_momentum=0.98, gsm_weight_decay=1e-4, adaptive_growth=1.5,
        calib_size=5000,
        ensemble_images=5000,
        ensemble_samples=2048,
        jit_compile=True,
    ),
}


# ------------------------------------------------------------------ data
@dataclasses.dataclass
class Data:
    """Arrays of one run and the `tf.data` pipelines made from them."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    batch_size: int
    seed: int
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    def train(self):
        """Shuffled, augmented training batches."""
        return kdata.make_dataset(
            self.x_train, self.y_train, self.batch_size, shuffle=True,
            augment=True, mean=self.mean, std=self.std, seed=self.seed,
        )

    def plain(self, x, y, batch_size=250):
        """Normalised, not augmented batches of `(x, y)`."""
        return kdata.make_dataset(
            x, y, batch_size, mean=self.mean, std=self.std
        )

    def calibration(self, size):
        """The first `size` training images, not augmented."""
        return self.plain(self.x_train[:size], self.y_train[:size])

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.x_train) / self.batch_size)


def load_data(args, profile: Profile, cache_dir: str) -> Data:
    """Decodes (once, cached) the folder and holds out the validation set."""
    images = os.path.join(cache_dir, "images")
    x, y = kdata.load_cifar10(args.data_dir, cache_dir=images)
    val_size = min(profile.val_size, len(x) // 5)
    (x_train, y_train), (x_val, y_val) = kdata.train_val_split(
        x, y, val_size=val_size, seed=0
    )
    if profile.train_size is not None:
        x_train = x_train[: profile.train_size]
        y_train = y_train[: profile.train_size]
    mean, std = kdata.channel_stats(x_train)
    result = Data(
        x_train, y_train, x_val, y_val, mean, std, profile.batch_size,
        args.seed,
    )
    if args.test_dir:
        result.x_test, result.y_test = kdata.load_image_folder(
            args.test_dir, (32, 32), cache_dir=images
        )
    return result


# ------------------------------------------------------------ training
def cosine(peak, epochs, data: Data):
    """Cosine decay from `peak` to 0 over `epochs` epochs."""
    return keras.optimizers.schedules.CosineDecay(
        peak, max(1, epochs * data.steps_per_epoch)
    )


def sgd(peak, epochs, data: Data, no_decay=()):
    """Nesterov momentum SGD, cosine lr, weight decay on kernels only.

    `no_decay` names more variables (by name) without weight decay.
    """
    optimizer = keras.optimizers.SGD(
        cosine(peak, epochs, data), momentum=MOMENTUM, nesterov=True,
        weight_decay=SGD_DECAY,
    )
    optimizer.exclude_from_weight_decay(
        var_names=["gamma", "beta", "bias", *no_decay]
    )
    return optimizer


def fit(model, optimizer, epochs, data: Data, profile: Profile, callbacks=()):
    """Trains on the augmented training split; returns the seconds."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=profile.jit_compile,
    )
    start = time.perf_counter()
    if epochs > 0:
        model.fit(
            data.train(), epochs=epochs, callbacks=list(callbacks),
            shuffle=False, verbose=2,
        )
    return time.perf_counter() - start


def logits(model, dataset) -> np.ndarray:
    return np.asarray(model.predict(dataset, verbose=0))


def accuracy(model, data: Data, split="val") -> float:
    x, y = (data.x_val, data.y_val) if split == "val" else (
        data.x_test, data.y_test
    )
    predicted = logits(model, data.plain(x, y)).argmax(axis=-1)
    return float(np.mean(predicted == y))


def narrow_widths(model, keep) -> tuple[int, int, int]:
    return tuple(target_width(w, keep) for w in model_widths(model))


def model_widths(model) -> tuple[int, int, int]:
    """Stage widths of a CIFAR ResNet (its stem and stage-1..3 convs)."""
    return tuple(
        model.get_layer(f"s{s}b1_1_conv").filters for s in (1, 2, 3)
    )


def new_model(args, widths=(16, 32, 64)):
    return models.resnet_cifar(DEPTHS[args.model], widths=widths)


# ---------------------------------------------------------- base model
def base_seed(args) -> int:
    """The seed of the base model: `--base-seed`, else `--seed`."""
    return args.seed if args.base_seed is None else args.base_seed


def base_path(args, cache_dir: str) -> str:
    folder = hashlib.sha1(
        os.path.abspath(args.data_dir).encode()
    ).hexdigest()[:8]
    name = f"{args.model}_{args.profile}_s{base_seed(args)}_{folder}"
    return os.path.join(cache_dir, name)


def base_model(args, profile, data, cache_dir):
    """Loads the cached base model, or trains and caches it.

    Returns:
        `(model, info)`, `info` = the cache's JSON (accuracy, epochs, time).
    """
    path = base_path(args, cache_dir)
    if os.path.isfile(path + ".keras") and os.path.isfile(path + ".json"):
        with open(path + ".json") as f:
            info = json.load(f)
        model = keras.models.load_model(path + ".keras", compile=False)
        return model, {**info, "cached": True}
    model = new_model(args)
    seconds = fit(
        model, sgd(profile.base_lr, profile.base_epochs, data),
        profile.base_epochs, data, profile,
    )
    info = {
        "accuracy": accuracy(model, data),
        "epochs": profile.base_epochs,
        "train_seconds": round(seconds, 1),
        "train_images": len(data.x_train),
    }
    os.makedirs(cache_dir, exist_ok=True)
    write_atomically(path + ".keras", model.save)
    write_atomically(
        path + ".json", lambda tmp: dump_json(info, tmp)
    )
    return model, {**info, "cached": False}


def runtime_accuracy(model, fmt, calibration, batches, threads=2) -> float:
    """Accuracy of `model` exported as `fmt` (`kc.export`; `calibration`
    is the int8 representative data) and run by its runtime over the
    labelled `(x, y)` `batches`."""
    runtime = kc.runtimes.for_format(fmt)
    correct = total = 0
    with tempfile.TemporaryDirectory() as folder:
        path = kc.export(model, os.path.join(folder, f"m{runtime.suffix}"),
                         fmt, data=calibration).path
        program = runtime.load(path, threads)
        for x, y in batches:
            y = np.asarray(y)
            correct += int(np.sum(
                program.run(np.asarray(x)).argmax(-1) == y))
            total += len(y)
    return correct / total


def write_atomically(path, writer):
    """`writer(tmp)` writes next to `path`; then `tmp` replaces `path`."""
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=os.path.dirname(path))
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ------------------------------------------------------------- methods
# Each method gets (base, ctx) and returns a dict with "final" (the model
# whose MACs and accuracy are reported), the accuracies it measured
# ("trained": before slimming, "slim": after, "finetuned"), "headline" (which
# accuracy is the method's result at `profile.epochs` epochs after the base
# model), "epochs" (epochs after the base model behind that accuracy) and
# "details".
@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    profile: Profile
    data: Data

    @property
    def keep(self) -> float:
        return self.args.keep

    def finetune(self, model, epochs):
        """Fine-tunes `model` in place; returns its accuracy."""
        fit(model, sgd(self.profile.lr, epochs, self.data), epochs,
            self.data, self.profile)
        return accuracy(model, self.data)


def run_scratch(base, ctx: Context):
    p = ctx.profile
    epochs = p.base_epochs + p.epochs
    model = new_model(ctx.args, narrow_widths(base, ctx.keep))
    fit(model, sgd(p.base_lr, epochs, ctx.data), epochs, ctx.data, p)
    acc = accuracy(model, ctx.data)
    return {
        "final": model,
        "accuracy": {"trained": acc, "slim": acc},
        "headline": "trained",
        "epochs": p.epochs,
        "details": {
            "widths": model_widths(model),
            "total_epochs_from_random": epochs,
        },
    }


def _plan_then_finetune(base, plan, ctx: Context, details=None):
    """Slims `base` by `plan`, measures it, fine-tunes `profile.epochs`."""
    small = kc.slim(base, plan)
    slim_acc = accuracy(small, ctx.data)
    tuned = ctx.finetune(small, ctx.profile.epochs)
    return {
        "final": small,
        "accuracy": {"slim": slim_acc, "finetuned": tuned},
        "headline": "finetuned",
        "epochs": ctx.profile.epochs,
        "details": {"widths": plan.widths(), **(details or {})},
    }


def run_magnitude(base, ctx: Context):
    plan = kc.methods.magnitude_plan(base, keep=ctx.keep, norm="l1")
    return _plan_then_finetune(base, plan, ctx, {"norm": "l1"})


def run_ensembles(base, ctx: Context):
    p = ctx.profile
    base.compile(
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=p.jit_compile,
    )
    start = time.perf_counter()
    scores = kc.methods.ensemble_importance(
        base, ctx.data.calibration(p.ensemble_images),
        samples=p.ensemble_samples, mask_keep=0.9, metric="loss",
        seed=ctx.args.seed, verbose=0,
    )
    seconds = time.perf_counter() - start
    plan = kc.plan_from_scores(base, scores, keep=ctx.keep)
    return _plan_then_finetune(base, plan, ctx, {
        "samples": p.ensemble_samples, "keep_prob": 0.9, "metric": "loss",
        "scoring_images": min(p.ensemble_images, len(ctx.data.x_train)),
        "scoring_seconds": round(seconds, 1),
    })


def run_similarity(base, ctx: Context):
    plan = kc.methods.similarity_plan(base, keep=ctx.keep,
                                      distance="wasserstein")
    return _plan_then_finetune(
        base, plan, ctx, {"metric": "wasserstein", "linkage": "average"}
    )


def run_functionality(base, ctx: Context):
    plan = kc.methods.functionality_plan(
        base, ctx.data.calibration(ctx.profile.calib_size), keep=ctx.keep
    )
    return _plan_then_finetune(base, plan, ctx, {
        "profile_images": min(ctx.profile.calib_size, len(ctx.data.x_train))
    })


def run_csgd(base, ctx: Context):
    p = ctx.profile
    plan = kc.make_plan(
        base, keep=ctx.keep, method="kmeans", seed=ctx.args.seed
    )
    optimizer = kc.CSGD(
        plan, learning_rate=cosine(p.lr, p.epochs, ctx.data),
        momentum=MOMENTUM, nesterov=True,
        centripetal_strength=p.centripetal_strength,
        weight_decay=COUPLED_DECAY,
        vector_strength_scale=p.vector_strength_scale,
    )
    fit(base, optimizer, p.epochs, ctx.data, p)
    val = ctx.data.plain(ctx.data.x_val, ctx.data.y_val)
    trained = logits(base, val)
    small = kc.slim(base, plan)
    slimmed = logits(small, val)
    y = ctx.data.y_val
    return {
        "final": small,
        "accuracy": {
            "trained": float(np.mean(trained.argmax(-1) == y)),
            "slim": float(np.mean(slimmed.argmax(-1) == y)),
        },
        "headline": "slim",
        "epochs": p.epochs,
        "details": {
            "widths": plan.widths(),
            "cluster_spread": kc.cluster_spread(base, plan)["overall"],
            "max_abs_logit_difference": float(
                np.max(np.abs(trained - slimmed))
            ),
            "centripetal_strength": p.centripetal_strength,
            "vector_strength_scale": p.vector_strength_scale,
            "learning_rate": p.lr,
        },
    }


def _soft_filter_pruning(base, ctx: Context, schedule):
    p = ctx.profile
    callback = kc.callbacks.AsymptoticSoftFilterPruning(
        rate=1 - ctx.keep, epochs=p.epochs, schedule=schedule,
        batchnorm=SOFT_PRUNING_BATCHNORM, verbose=0,
    )
    fit(base, sgd(p.lr, p.epochs, ctx.data), p.epochs, ctx.data, p,
        [callback])
    trained = accuracy(base, ctx.data)
    small = kc.slim(base, callback.plan)
    slim_acc = accuracy(small, ctx.data)
    tuned = ctx.finetune(small, p.short_finetune)
    return {
        "final": small,
        "accuracy": {
            "trained": trained, "slim": slim_acc, "finetuned": tuned
        },
        "headline": "slim",
        "epochs": p.epochs,
        "details": {
            "widths": callback.plan.widths(),
            "rate": 1 - ctx.keep,
            "schedule": schedule,
            "batchnorm": SOFT_PRUNING_BATCHNORM,
            "finetune_epochs": p.short_finetune,
        },
    }


def run_asfp(base, ctx: Context):
    return _soft_filter_pruning(base, ctx, "asymptotic")


def run_sfp(base, ctx: Context):
    return _soft_filter_pruning(base, ctx, "constant")


def run_gsm(base, ctx: Context):
    p = ctx.profile
    optimizer = kc.GSM(
        compression=GSM_COMPRESSION,
        learning_rate=cosine(p.gsm_lr, p.epochs, ctx.data),
        momentum=p.gsm_momentum, weight_decay=p.gsm_weight_decay,
    )
    fit(base, optimizer, p.epochs, ctx.data, p)
    trained = accuracy(base, ctx.data)
    report = kc.sparsify(base, density=1 / GSM_COMPRESSION)
    return {
        "final": base,
        "accuracy": {"trained": trained, "slim": accuracy(base, ctx.data)},
        "headline": "slim",
        "epochs": p.epochs,
        "details": {
            "unstructured": True,
            "compression": GSM_COMPRESSION,
            "density": report["density"],
            "nonzero_kernel_weights": report["nonzero"],
            "kernel_weights": report["size"],
            "learning_rate": p.gsm_lr,
            "momentum": p.gsm_momentum,
            "weight_decay": p.gsm_weight_decay,
        },
    }


def run_cap(base, ctx: Context):
    p = ctx.profile
    plan = kc.methods.magnitude_plan(base, keep=ctx.keep, norm="l1")
    plain = accuracy(kc.slim(base, plan), ctx.data)
    start = time.perf_counter()
    stats = compensation.collect_statistics(
        base, ctx.data.calibration(p.calib_size), verbose=0
    )
    small = compensation.compensate(base, plan, stats)
    seconds = time.perf_counter() - start
    return {
        "final": small,
        "accuracy": {"slim": accuracy(small, ctx.data)},
        "headline": "slim",
        "epochs": 0,
        "details": {
            "plan": "magnitude (l1)",
            "plain_removal_accuracy": plain,
            "statistics_images": min(p.calib_size, len(ctx.data.x_train)),
            "compensation_seconds": round(seconds, 1),
        },
    }


def run_adaptive(base, ctx: Context):
    p = ctx.profile
    target = kc.count_macs(
        kc.slim(base, kc.make_plan(base, keep=ctx.keep))
    ) / kc.count_macs(base)
    gates = AdaptiveGates(base, macs_target=target)
    # The penalty grows by `adaptive_growth` per epoch, in 10 steps, until
    # the MACs reach the target; then the gates lock (the smallest at
    # exactly 0) and the rest of the epochs fine-tune the pruned network.
    steps = max(1, ctx.data.steps_per_epoch // ADAPTIVE_ADJUSTMENTS)
    callback = MacsTargetCallback(
        gates, factor=p.adaptive_growth ** (1 / ADAPTIVE_ADJUSTMENTS),
        steps=steps,
    )
    fit(gates.model, sgd(p.lr, p.epochs, ctx.data, no_decay=["gate"]),
        p.epochs, ctx.data, p, [callback])
    trained = accuracy(gates.model, ctx.data)
    folded, plan = gates.finalize()
    small = kc.slim(folded, plan)
    slim_acc = accuracy(small, ctx.data)
    out = {
        "final": small,
        "accuracy": {"trained": trained, "slim": slim_acc},
        "headline": "slim",
        "epochs": p.epochs,
        "details": {
            "macs_target": target,
            "penalty_growth_per_epoch": p.adaptive_growth,
            "penalty_adjust_every_steps": steps,
            "locked": gates.locked,
            "locked_at_epoch": None if callback.locked_at_step is None
            else round(callback.locked_at_step / ctx.data.steps_per_epoch, 2),
            "removed_blocks": list(plan.remove_blocks),
            "widths": plan.widths(),
        },
    }
    if not gates.locked:  # the smallest open gates were closed: fine-tune
        out["accuracy"]["finetuned"] = ctx.finetune(small, p.short_finetune)
        out["headline"] = "finetuned"
        out["epochs"] += p.short_finetune
    return out


METHODS = {
    "scratch": run_scratch,
    "magnitude": run_magnitude,
    "csgd": run_csgd,
    "asfp": run_asfp,
    "sfp": run_sfp,
    "ensembles": run_ensembles,
    "gsm": run_gsm,
    "cap": run_cap,
    "similarity": run_similarity,
    "functionality": run_functionality,
    "adaptive": run_adaptive,
}


# -------------------------------------------------------------- report
def command(script: str, argv=None) -> str:
    """The command line that ran `benchmarks/<script>`, as a shell string."""
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{script}", *args])


def machine() -> dict:
    """The machine (CPU model, SIMD flags, cores, GPUs), its load, versions.

    One record for every benchmark JSON: `kc.latency.timing.machine()` and
    `versions()`, plus the load average and the Python version.
    """
    from keras_csgd.latency import timing

    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        load = None
    return {
        **timing.machine(),
        "load_average_at_start": load,
        "python": platform.python_version(),
        **timing.versions(),
    }


def result_name(args) -> str:
    suffix = "" if args.keep == 0.625 else f"_k{args.keep:g}"
    return f"{args.model}_{args.method}_{args.profile}_s{args.seed}{suffix}"


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(DEPTHS), default="resnet20")
    parser.add_argument("--method", choices=list(METHODS), required=True)
    parser.add_argument("--profile", choices=list(PROFILES), default="quick")
    parser.add_argument(
        "--data-dir", required=True,
        help="CIFAR-10 training image folder (class subfolders), or a "
        "folder holding it as train/",
    )
    parser.add_argument(
        "--test-dir", help="a separate labelled image folder to evaluate on"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--base-seed", type=int,
        help="seed of the base model (default: --seed); another --seed "
        "with the same --base-seed repeats only the method",
    )
    parser.add_argument("--keep", type=float, default=0.625)
    parser.add_argument(
        "--cache-dir", default=os.path.join(HERE, "cache"),
        help="base models and decoded images (default benchmarks/cache)",
    )
    parser.add_argument(
        "--results-dir", default=os.path.join(HERE, "results"),
        help="where the JSON goes (default benchmarks/results)",
    )
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    fraction("keep", args.keep)
    profile = PROFILES[args.profile]
    info = machine()
    keras.utils.set_random_seed(base_seed(args))
    data = load_data(args, profile, args.cache_dir)
    base, base_info = base_model(args, profile, data, args.cache_dir)
    base_macs, base_params = kc.count_macs(base), base.count_params()
    test = {}
    if data.x_test is not None:
        test["base"] = accuracy(base, data, "test")
    ctx = Context(args, profile, data)
    keras.utils.set_random_seed(args.seed)
    start = time.perf_counter()
    out = METHODS[args.method](base, ctx)
    seconds = time.perf_counter() - start
    final = out["final"]
    if data.x_test is not None:
        test["final"] = accuracy(final, data, "test")
    macs = kc.count_macs(final)
    acc = {"base": base_info["accuracy"], "trained": None, "slim": None,
           "finetuned": None, **out["accuracy"]}
    acc["final"] = acc[out["headline"]]
    result = {
        "model": args.model,
        "method": args.method,
        "profile": args.profile,
        "seed": args.seed,
        "base_seed": base_seed(args),
        "keep": args.keep,
        "accuracy": acc,
        "headline": out["headline"],
        "test_accuracy": test or None,
        "macs": {"base": base_macs, "final": macs, "ratio": macs / base_macs,
                 "reduction": 1 - macs / base_macs},
        "params": {"base": base_params, "final": final.count_params()},
        "epochs": {"base": profile.base_epochs, "method": out["epochs"]},
        "wall_seconds": {"method": round(seconds, 1),
                         "base_training": base_info["train_seconds"],
                         "base_cached": base_info["cached"]},
        "data": {
            "train_images": len(data.x_train),
            "val_images": len(data.x_val),
            "validation": f"last {len(data.x_val)} of a fixed shuffle "
            "(seed 0) of the training folder",
            "test_images": None if data.x_test is None else len(data.x_test),
        },
        "profile_settings": dataclasses.asdict(profile),
        "details": out["details"],
        "command": command("cifar10.py", argv),
        "machine": info,
    }
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, result_name(args) + ".json")
    write_atomically(path, lambda tmp: dump_json(result, tmp))
    print(
        f"{args.model} {args.method} ({args.profile}, seed {args.seed}): "
        f"accuracy {acc['final']:.4f} ({out['headline']}; base "
        f"{acc['base']:.4f}), MACs x{macs / base_macs:.3f}, "
        f"{seconds:.0f} s -> {path}"
    )
    return result


if __name__ == "__main__":
    main()
