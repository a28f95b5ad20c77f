"""`keras-csgd prune` and its nine methods."""

from __future__ import annotations

import os
import warnings

import keras

import keras_csgd as kc
from keras_csgd.cli import adaptive, recovery
from keras_csgd.cli.common import (
    CommandError,
    add_runtime,
    existing_file,
    fraction,
    latency_fraction,
    load_data,
    load_model,
    output_path,
    positive_int,
    write_atomically,
    write_text,
)
from keras_csgd.latency.target import TOLERANCE, met
from keras_csgd.methods import compensation
from keras_csgd.recover import compile_classifier

# The trained methods' settings for short schedules (`prune --epochs`, the
# demo), each trained by `kc.fine_tune`'s recipe (cosine learning rate from
# `learning_rate`; flip/crop with --augment). C-SGD: the weakest
# centripetal pull that collapses the clusters (and silences removed
# blocks) by CSGD_COLLAPSE over the schedule (`csgd_optimizer`). On
# `benchmarks/latency_methods.py`'s 0.5 plan (seeds 0 and 1): lr 0.03 and a
# fixed strength of 0.3 gave 75.5%, lr 0.03 and 0.2 75.9%, lr 0.05 and 0.15
# 76.3%, against 76.0% for magnitude + `kc.fine_tune` (README, "Removed
# blocks").
# Warnings raised from this package's files are the command's to print.
PACKAGE = os.path.dirname(os.path.abspath(kc.__file__)) + os.sep
CSGD_LEARNING_RATE = 0.05
CSGD_COLLAPSE = 1e-6
CSGD_SETTINGS = {
    "momentum": 0.9,
    "vector_strength_scale": 1.0,
    "weight_decay": 1e-4,
}
# GSM as in its paper's CIFAR runs (`prune --method gsm`).
GSM_LEARNING_RATE = 5e-3
GSM_SETTINGS = {"momentum": 0.98, "weight_decay": 1e-4}
# ASFP: zeroes a BN-followed channel's gamma and beta (`batchnorm="scale"`;
# zeroing kernels behind BN collapsed a trained ResNet-20 to 17.6% in 3
# epochs), every ASFP_STEPS batches rather than every epoch, from this
# learning rate. On the latency plan of `benchmarks/latency_methods.py`
# (3 epochs on 9k CIFAR images, 1k held out): 57.8% pruning every epoch
# at lr 0.01, 69.3% every 20 batches, 71.0% every 5, 74.2% every 5 at lr
# 0.03, 76.2% distilled from the input model as well (magnitude +
# `kc.fine_tune`: 75.7%). On a later base, 4 seeds on one 0.5 plan:
# 76.05% at lr 0.03, 76.59% at 0.05, 76.53% at 0.08 (magnitude 76.93%).
# Channels ranked by their kernel's norm rather than the BN-folded
# filter's: 77.08% against 76.48% over 8 seeds (magnitude 76.96%).
ASFP_STEPS = 5
ASFP_LEARNING_RATE = 0.05
ASFP_SETTINGS = {"batchnorm": "scale", "steps": ASFP_STEPS,
                 "ranking": "kernel"}
# Ensembles with --latency: the latency plan (L1 norms scaled per group)
# sets the widths and removed blocks, and the ensembles' scores choose
# which channels each group keeps. Planning the widths from the ensembles'
# scores themselves (noisy regression coefficients of accuracy, which do
# not compare across layers) gave 73.6% against magnitude's 76.0% on
# `benchmarks/latency_methods.py` (seed 0); raw, unscaled scores 69.4%.


def _needs_data(data, args):
    if data is None:
        raise CommandError(f"--method {args.method} needs --data")


# Methods: `(model, data, args) -> (plan, slim model)`, `args` holding
# `keep`, `latency` (`None`, or a target with `runtime`, `batch_size` and
# `threads`), `round_to`, `epochs` and `seed`. The ones in TRAINED train the
# full model for `--epochs`; the ones in PLANNED plan from the trained
# model, and `--epochs` fine-tunes their slim model.
def _csgd(model, data, args):
    if _targeted(args):
        plan = _latency_plan(model, args, clusters="kmeans")
    else:
        plan = kc.make_plan(model, keep=args.keep, method="kmeans",
                            seed=args.seed, round_to=args.round_to)
    recovery.train(model, data, args, CSGD_LEARNING_RATE,
                   csgd_optimizer(plan), distill=True)
    return plan, kc.slim(model, plan)


def csgd_optimizer(plan):
    """`schedule -> kc.CSGD`: C-SGD on `kc.fine_tune`'s cosine schedule,
    its strength the weakest that collapses the clusters by CSGD_COLLAPSE
    by the schedule's end (`kc.optimizers.collapse_strength`)."""
    def make(rate):
        strength = kc.optimizers.collapse_strength(
            rate, rate.decay_steps, momentum=CSGD_SETTINGS["momentum"],
            collapse=CSGD_COLLAPSE)
        print(f"C-SGD: centripetal strength {strength:.3g}, which shrinks "
              f"the clusters' spread by {CSGD_COLLAPSE:g} over "
              f"{rate.decay_steps} steps")
        return kc.CSGD(plan, learning_rate=rate, centripetal_strength=strength,
                       **CSGD_SETTINGS)
    return make


def _asfp(model, data, args):
    settings = {**ASFP_SETTINGS, "verbose": 0}
    if _targeted(args):
        asfp = kc.callbacks.AsymptoticSoftFilterPruning.from_plan(
            _latency_plan(model, args), **settings)
    else:
        asfp = kc.callbacks.AsymptoticSoftFilterPruning(
            rate=1 - args.keep, **settings)
    recovery.train(model, data, args, ASFP_LEARNING_RATE, callbacks=[asfp],
                   distill=True)
    return asfp.plan, kc.slim(model, asfp.plan)


def _gsm(model, data, args):
    """Unstructured: `--keep` is the kept fraction of the kernel weights."""
    recovery.train(model, data, args, GSM_LEARNING_RATE,
                   lambda rate: kc.GSM(density=args.keep, learning_rate=rate,
                                       **GSM_SETTINGS), distill=True)
    kc.sparsify(model, density=args.keep)
    plan = kc.PruningPlan({}, groups=kc.channel_groups(model))
    return plan, kc.slim(model, plan)


def _magnitude(model, data, args):
    if _targeted(args):
        plan = _latency_plan(model, args)  # L1 norms by default
    else:
        plan = kc.methods.magnitude_plan(model, keep=args.keep,
                                         round_to=args.round_to)
    return plan, kc.slim(model, plan)


def _similarity(model, data, args):
    plan = kc.methods.similarity_plan(model, data, keep=args.keep,
                                      round_to=args.round_to)
    return plan, kc.slim(model, plan)


def _functionality(model, data, args):
    _needs_data(data, args)
    plan = kc.methods.functionality_plan(model, data, keep=args.keep,
                                         round_to=args.round_to)
    return plan, kc.slim(model, plan)


def _ensembles(model, data, args):
    _needs_data(data, args)
    compile_classifier(model, "sgd")
    scores = kc.methods.ensemble_importance(
        model, recovery.sample(data, args), seed=args.seed,
        verbose=args.verbose,
    )
    if _targeted(args):
        # The L1 latency plan's widths and blocks; the ensembles' scores
        # choose the channels (ensembles note at the top).
        timed = _latency_plan(model, args)
        plan = kc.latency.plan_at_widths(model, timed.widths(),
                                         timed.remove_blocks, scores)
    else:
        plan = kc.plan_from_scores(model, scores, keep=args.keep,
                                   round_to=args.round_to)
    return plan, kc.slim(model, plan)


def _cap(model, data, args):
    """Magnitude (or latency) plan, consumers refitted by least squares
    (CaP)."""
    _needs_data(data, args)
    if _targeted(args):
        plan = _latency_plan(model, args)
    else:
        plan = kc.methods.magnitude_plan(model, keep=args.keep,
                                         round_to=args.round_to)
    stats = compensation.collect_statistics(model, data,
                                            verbose=args.verbose)
    return plan, compensation.compensate(model, plan, stats, data=data)


def _targeted(args) -> bool:
    """Whether the plan is `--latency`'s or `--plan`'s (not `--keep`'s)."""
    return args.latency is not None or args.plan is not None


def _latency_plan(model, args, scores=None, clusters="prune"):
    """`kc.plan_for_latency` at `--latency`, its report going to `args`;
    or `--plan`'s widths and removed blocks, carried out with `scores`
    (default L1 norms) or `clusters`."""
    if args.plan is not None:
        given = args.given_plan
        return kc.latency.plan_at_widths(
            model, given.widths(), given.remove_blocks, scores,
            clusters=clusters, seed=args.seed)
    plan, args.latency_report = kc.plan_for_latency(
        model, args.latency, args.runtime, args.batch_size, scores=scores,
        clusters=clusters, threads=args.threads, seed=args.seed,
        return_report=True, verbose=args.verbose,
    )
    return plan


TRAINED = {"csgd": _csgd, "asfp": _asfp, "gsm": _gsm,
           "adaptive": adaptive.run}
# Trained methods whose slim model `--epochs` fine-tunes as well (their
# training only chooses the plan).
TUNED = ("adaptive",)
PLANNED = {
    "magnitude": _magnitude,
    "similarity": _similarity,
    "functionality": _functionality,
    "ensembles": _ensembles,
    "cap": _cap,
}
METHODS = {**TRAINED, **PLANNED}
# The methods that plan to `--latency` (the others take `--keep` only),
# and those that carry out a given `--plan` (adaptive learns its own).
LATENCY_METHODS = ("adaptive", "asfp", "cap", "csgd", "ensembles",
                   "magnitude")
PLAN_METHODS = tuple(m for m in LATENCY_METHODS if m != "adaptive")


def _plan_path(out):
    return out[: -len(".keras")] + ".plan.json"


def cmd_prune(args):
    existing_file(args.model, "model")
    output_path(args.out, ".keras", source=args.model)
    if args.data is not None and not os.path.exists(args.data):
        raise CommandError(f"--data {args.data!r} does not exist")
    if args.latency is not None and args.method not in LATENCY_METHODS:
        raise CommandError(
            f"--latency works with --method {', '.join(LATENCY_METHODS)}; "
            f"got --method {args.method}"
        )
    if args.plan is not None and args.method not in PLAN_METHODS:
        raise CommandError(
            f"--plan works with --method {', '.join(PLAN_METHODS)}; got "
            f"--method {args.method}"
        )
    given = [f"--{k}" for k in ("keep", "latency", "plan")
             if getattr(args, k) is not None]
    if len(given) > 1:
        raise CommandError(f"give one of --keep, --latency, --plan; got "
                           f"{' and '.join(given)}")
    if args.keep is None:
        args.keep = 0.625
    if args.plan is not None:
        existing_file(args.plan, "--plan")
        with open(args.plan) as f:
            args.given_plan = kc.PruningPlan.from_json(f.read())
    trains = args.method in TRAINED
    if trains and args.data is None:
        raise CommandError(f"--method {args.method} needs --data")
    model = load_model(args.model)
    data = load_data(args.data, model)
    if args.epochs is None:
        args.epochs = 10 if trains else 0
    if args.epochs and data is None:
        raise CommandError("--epochs needs --data")
    args.verbose = recovery.progress()
    data, val = recovery.hold_out(data, args)
    model_accuracy = None if val is None else kc.recover.evaluate(
        model, *val)[0]
    before, params = kc.count_macs(model), model.count_params()
    keras.utils.set_random_seed(args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        plan, slim = METHODS[args.method](model, data, args)
    for w in caught:  # the library's own: slim's checks (clusters not
        # collapsed, live blocks), a latency table that failed its checks
        if os.path.abspath(w.filename).startswith(PACKAGE):
            print(f"warning: {w.message}")
    trained = getattr(args, "trained", model) if trains else None
    agreement = recovery.agreement(args, val, trained, slim)
    tuned = None
    if args.epochs and (not trains or args.method in TUNED):
        tuned = recovery.fine_tune(slim, model, data, val, args)
    report = getattr(args, "latency_report", None)
    if report is not None:
        measured = (report.full_ms, report.slim_ms, report.measured_ratio)
    elif getattr(args, "measured", None) is not None:  # adaptive's
        measured = args.measured
    elif args.latency is not None:  # a method that made no report
        measured = kc.latency.time_against_full(
            model, slim, args.runtime, args.batch_size, threads=args.threads
        )
    write_atomically(
        [
            (args.out, slim.save),
            (_plan_path(args.out), write_text(plan.to_json())),
        ]
    )
    after = kc.count_macs(slim)
    print(
        f"{args.method}: MACs {before:,} -> {after:,} "
        f"({after / before:.1%}), params {params:,} -> "
        f"{slim.count_params():,}; wrote {args.out} and "
        f"{_plan_path(args.out)}"
    )
    recovery.report(val, model_accuracy, slim, trained, tuned, agreement)
    if args.latency is None:
        return
    full_ms, slim_ms, ratio = measured
    tail = ")" if report is None else (
        f", predicted {report.predicted_ratio:.1%}); "
        f"{len(report.remove_blocks)} blocks removed; plans timed: "
        + ", ".join(f"{h['measured_ratio']:.1%}" for h in report.iterations)
    )
    print(
        f"latency ({args.runtime}, batch {args.batch_size}, measured "
        f"interleaved): full {full_ms:.3f} ms -> slim {slim_ms:.3f} ms "
        f"({ratio:.1%}; target {args.latency:.1%}{tail}"
    )
    if report is not None and report.reason:
        print(f"latency target missed: {report.reason}")
    elif report is None and not met(ratio, args.latency):
        # adaptive's last timing, judged as plan_for_latency judges.
        print(f"latency target missed: measured {ratio:.1%} of the full "
              f"latency, more than {TOLERANCE:.0%} above the target after "
              f"{adaptive.TRIES} timings of tightened gates (the machine "
              "may be busy, or latency at these widths is not additive)")


def add_prune(sub):
    prune = sub.add_parser(
        "prune",
        help="prune a .keras model, write the slim model and plan JSON",
        description="Prunes MODEL with --method, slims it and writes the "
        "slim model to --out and its plan to <out>.plan.json. --data is an "
        "image folder (scaled to [0, 1]) or an .npz with arrays x, y.",
    )
    prune.add_argument("model", help="input .keras model")
    prune.add_argument("--method", choices=sorted(METHODS), required=True)
    prune.add_argument("--keep", type=fraction, default=None,
                       help="kept fraction per group (default 0.625; gsm: "
                       "of the kernel weights; adaptive: the MACs of that "
                       "width are the target)")
    prune.add_argument("--latency", type=latency_fraction,
                       help="instead of --keep: the slim latency as a "
                       "fraction of the full model's, measured on "
                       "--runtime on this machine (methods: "
                       + ", ".join(LATENCY_METHODS) + ")")
    add_runtime(prune)
    prune.add_argument("--plan", help="instead of --keep or --latency: "
                       "carry out the widths and removed blocks of this "
                       "plan JSON (e.g. the .plan.json of a `prune "
                       "--latency` run, made where the model will run), "
                       "this method choosing the channels (methods: "
                       + ", ".join(PLAN_METHODS) + ")")
    prune.add_argument("--data", help="image folder or .npz (x, y)")
    prune.add_argument("--epochs", type=int,
                       help="training epochs (" + ", ".join(
                           m for m in TRAINED if m not in TUNED)
                       + "; default 10) or fine-tuning epochs of the slim "
                       "model (others; default 0, adaptive 10; "
                       "kc.fine_tune: cosine lr, distilled from the input "
                       "model; adaptive's gates learn for "
                       f"{adaptive.GATE_EPOCHS} epoch before)")
    recovery.add_arguments(prune)
    prune.add_argument("--round-to", type=positive_int,
                       help="round widths to a multiple of this")
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--out", required=True, help="output .keras file")
    prune.set_defaults(func=cmd_prune)
    return prune
