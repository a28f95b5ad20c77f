"""What `keras-csgd prune` did to accuracy: its validation split, the
fine-tuning of planned methods' slim models (`kc.fine_tune`) and the
accuracy lines it prints."""

from __future__ import annotations

import argparse
import sys

import keras
import numpy as np

from keras_csgd import recover
from keras_csgd.cli.common import positive_int, split_fraction

# Methods whose slim model computes what their trained model does.
EXACT = ("adaptive", "asfp", "csgd")
# The batch size of training and fine-tuning (`kc.fine_tune`'s default).
BATCH_SIZE = 64


def progress() -> int:
    """Keras verbosity: progress bars on a terminal, else a line a step."""
    return 1 if sys.stdout.isatty() else 2


def hold_out(data, args):
    """`(train, val)` of `--data` by `--val-split`; prints what it held
    out. `val` is `None` for `--val-split 0`."""
    if data is None:
        return None, None
    train, val = recover.split_validation(*data, args.val_split, args.seed)
    if val is not None:
        print(f"held out {len(val[0])} of {len(data[0])} samples of --data "
              f"for validation (--val-split {args.val_split:g}, seed "
              f"{args.seed}); the method sees the other {len(train[0])}")
    return train, val


def sample(data, args):
    """At most `--ensemble-images` samples of `(x, y)`, drawn by `--seed`."""
    x, y = data
    if len(x) <= args.ensemble_images:
        return data
    keep = np.random.default_rng(args.seed).permutation(len(x))
    keep = np.sort(keep[: args.ensemble_images])
    print(f"ensembles: scoring on {len(keep)} of {len(x)} samples "
          "(--ensemble-images)")
    return x[keep], y[keep]


def frozen_copy(model):
    """The input model as it is before training: the teacher to distil
    from and the full model to time against."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def train(model, data, args, learning_rate, optimizer=None, callbacks=(),
          distill=False, epochs=None):
    """Trains a trained method's model on `--data` for `epochs` (default
    `--epochs`) by `kc.fine_tune`'s recipe (cosine lr from
    `learning_rate`; flip/crop with `--augment`), with its `optimizer` (a
    function of the lr schedule) and `callbacks`; distilled from a copy of
    the input model when `distill` and `--distill`."""
    teacher = frozen_copy(model) if distill and args.distill else None
    return recover.fine_tune(
        model, data, teacher=teacher,
        epochs=args.epochs if epochs is None else epochs,
        validation_split=0, learning_rate=learning_rate,
        batch_size=BATCH_SIZE, augment=_augment(args), seed=args.seed,
        verbose=args.verbose, optimizer=optimizer, callbacks=callbacks,
    )


def _augment(args):
    """`--augment`: flip/crop image inputs (`"auto"`), or none."""
    return "auto" if args.augment else False


def fine_tune(slim, teacher, train, val, args):
    """`kc.fine_tune` of a planned method's slim model; its report."""
    return recover.fine_tune(
        slim, train, teacher=teacher if args.distill else None,
        epochs=args.epochs, validation_split=0, batch_size=BATCH_SIZE,
        validation_data=val, augment=_augment(args), seed=args.seed,
        verbose=args.verbose,
    )


def agreement(args, val, trained, slim):
    """`(argmax agreement, max logit difference)` of an EXACT method's
    slim and trained models on `val`, measured before any fine-tuning;
    `None` for the other methods or without `val`."""
    if val is None or trained is None or args.method not in EXACT:
        return None
    return recover.agreement(trained, slim, val[0])


def report(val, model_accuracy, slim, trained=None, tuned=None,
           agreement=None):
    """Prints the validation accuracies (and the `agreement` of an EXACT
    method's slim and trained models)."""
    if val is None:
        return
    parts = [f"input model {model_accuracy:.2%}"]
    if trained is not None:
        parts.append(f"trained model {recover.evaluate(trained, *val)[0]:.2%}")
    if tuned is None:
        slim_part = f"slim model {recover.evaluate(slim, *val)[0]:.2%}"
        if trained is None:
            slim_part += " (not fine-tuned: --epochs 0)"
    else:
        how = " (distilled from the input model)" if tuned.distilled else ""
        slim_part = (f"slim model {tuned.accuracy_before:.2%} before "
                     f"fine-tuning, {tuned.accuracy_after:.2%} after "
                     f"{tuned.epochs} epochs{how}")
    print(f"accuracy on the {len(val[0])} held-out samples: "
          + "; ".join(parts + [slim_part]))
    if agreement is not None:
        same, difference = agreement
        when = "" if tuned is None else " (before fine-tuning)"
        print(f"slim vs trained model on them{when}: argmax agreement "
              f"{same:.2%}, max logit difference {difference:.1e} of the "
              "largest logit")


def add_arguments(parser):
    """The options of validation, fine-tuning and ensembles sampling."""
    parser.add_argument("--val-split", type=split_fraction, default=0.1,
                        help="fraction of --data held out (seeded) to "
                        "measure accuracy on; the method and fine-tuning "
                        "use the rest (default 0.1; 0: no accuracy)")
    parser.add_argument("--distill", action=argparse.BooleanOptionalAction,
                        default=True,
                        help="fine-tune planned methods' slim models on the "
                        "input model's logits as well as the labels "
                        "(default on)")
    parser.add_argument("--augment", action=argparse.BooleanOptionalAction,
                        default=False,
                        help="random flip and crop of image inputs while "
                        "fine-tuning (default off: it cost half a point in "
                        "3 epochs on CIFAR-10)")
    parser.add_argument("--ensemble-images", type=positive_int,
                        default=500,
                        help="ensembles: samples of --data (drawn by "
                        "--seed) each random mask is scored on (default "
                        "500)")
