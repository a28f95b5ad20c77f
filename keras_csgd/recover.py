"""Recovery after pruning: `fine_tune` a slim model, report the accuracy.

One function that the command line and the benchmarks share: a validation
split held out of the data (seeded), Nesterov SGD with a cosine learning
rate, flip and crop augmentation for images, and distillation from the
unpruned model (`keras.distillation`) when a teacher is given. Its report
holds the validation accuracy before and after.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import keras
import numpy as np

from keras_csgd import batches, checks
from keras_csgd import data as kdata

# The defaults of `fine_tune`, chosen by `benchmarks/recovery.py` (README,
# "Recovery after pruning"; 3 epochs, two seeds): a cosine schedule added a
# point, distillation another (alpha 0.9 as 0.5), a peak lr of 0.03 two
# more than 0.01 (0.1 less); flip/crop augmentation cost half a point.
LEARNING_RATE = 0.03
TEMPERATURE = 4.0
ALPHA = 0.5


def outputs_probabilities(model) -> bool:
    """Whether `model` ends in a softmax (probabilities, not logits)."""
    last = model.layers[-1]
    if isinstance(last, keras.layers.Softmax):
        return True
    activation = getattr(last, "activation", None)
    return getattr(activation, "__name__", "") == "softmax"


def classifier_loss(model):
    """Sparse cross-entropy on logits, or on probabilities after softmax."""
    return keras.losses.SparseCategoricalCrossentropy(
        from_logits=not outputs_probabilities(model)
    )


def compile_classifier(model, optimizer="sgd"):
    """Compiles `model` with `classifier_loss` and the accuracy metric."""
    model.compile(optimizer=optimizer, loss=classifier_loss(model),
                  metrics=["accuracy"])


def split_validation(x, y, validation_split=0.1, seed=0):
    """Holds out a seeded random `validation_split` of `(x, y)`.

    Args:
        x: inputs, first axis = sample.
        y: labels, same length.
        validation_split: fraction held out, in `[0, 1)`; at least one
            sample when positive. Defaults to `0.1`.
        seed: shuffle seed. Defaults to `0`.

    Returns:
        `((x_train, y_train), (x_val, y_val))`; the validation part is
        `None` when `validation_split` is 0.

    Raises:
        ValueError: `validation_split` outside `[0, 1)`, or too few samples
            to hold any out.

    Example:

    ```python
    (x_train, y_train), val = split_validation(x, y, 0.1)
    ```
    """
    checks.fraction("validation_split", validation_split, low_open=False,
                    high_closed=False)
    if validation_split == 0:
        return (x, y), None
    size = max(1, round(validation_split * len(x)))
    if size >= len(x):
        raise ValueError(
            "`validation_split` must leave samples to train on. "
            f"Received: validation_split={validation_split} of {len(x)}"
        )
    return kdata.train_val_split(x, y, val_size=size, seed=seed)


def agreement(model, other, x, batch_size=256):
    """How closely `other` computes what `model` does on `x`.

    Returns:
        `(argmax agreement, max |logit difference| relative to the largest
        |logit| of model)`.
    """
    a = np.asarray(model.predict(x, batch_size=batch_size, verbose=0))
    b = np.asarray(other.predict(x, batch_size=batch_size, verbose=0))
    same = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    return same, float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-12))


@dataclasses.dataclass
class FineTuneReport:
    """What `fine_tune` did, measured on the validation split.

    Attributes:
        accuracy_before: validation accuracy of the model before, or
            `None` without a validation split.
        accuracy_after: validation accuracy after.
        loss_before: validation cross-entropy before.
        loss_after: validation cross-entropy after.
        teacher_accuracy: the teacher's validation accuracy, or `None`.
        epochs: epochs trained.
        distilled: whether the teacher's logits were distilled.
        augmented: whether flip and crop augmentation was used.
        train_samples: samples trained on (`None` for a dataset).
        validation_samples: samples validated on.
        seconds: training time.
        model: the model, trained in place.
    """

    accuracy_before: float | None
    accuracy_after: float | None
    loss_before: float | None
    loss_after: float | None
    teacher_accuracy: float | None
    epochs: int
    distilled: bool
    augmented: bool
    train_samples: int | None
    validation_samples: int | None
    seconds: float
    model: keras.Model = dataclasses.field(repr=False, compare=False,
                                           default=None)

    def as_dict(self) -> dict:
        """The fields except `model` (JSON-ready)."""
        fields = dataclasses.asdict(dataclasses.replace(self, model=None))
        fields.pop("model")
        return fields

    def __str__(self) -> str:
        how = ", ".join(
            part for part, used in (
                ("distilled from the teacher", self.distilled),
                ("flip/crop augmentation", self.augmented),
            ) if used
        ) or "labels only"
        text = f"fine-tuned {self.epochs} epochs ({how})"
        if self.accuracy_before is None:
            return text + "; no validation split"
        text += (
            f": validation accuracy {self.accuracy_before:.2%} -> "
            f"{self.accuracy_after:.2%} on {self.validation_samples} samples"
        )
        if self.teacher_accuracy is not None:
            text += f" (teacher {self.teacher_accuracy:.2%})"
        return text


class _ProbabilityLogits(keras.distillation.LogitsDistillation):
    """`LogitsDistillation` for models that may end in a softmax.

    A softmax output `p` becomes the logits `log p` (equal to the logits
    up to a constant per sample, so `softmax(log p / T)` is the tempered
    softmax); logits pass through.
    """

    def __init__(self, temperature, teacher_softmax, student_softmax):
        super().__init__(temperature=temperature,
                         loss=keras.losses.KLDivergence())
        self.softmax = (teacher_softmax, student_softmax)

    def compute_loss(self, teacher_outputs, student_outputs, **kwargs):
        teacher, student = (
            keras.ops.log(keras.ops.maximum(out, 1e-12)) if soft else out
            for out, soft in zip((teacher_outputs, student_outputs),
                                 self.softmax)
        )
        return super().compute_loss(teacher, student, **kwargs)


class _Distiller(keras.distillation.Distiller):
    """`keras.distillation.Distiller` that keeps the student's own losses.

    Keras's `Distiller.compute_loss` returns the weighted student and
    distillation losses only, so the losses a student adds itself (weight
    regularizers, `add_loss`: e.g. `AdaptiveGates`' sparsity penalty) would
    be dropped in silence; they are added here, as `Model.compute_loss`
    adds them without a teacher.
    """

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        total = super().compute_loss(x, y, y_pred, sample_weight, training)
        own = self.student.losses
        return total + keras.ops.sum(own) if own else total


def _resolve_augment(augment, x, dataset: bool) -> bool:
    if augment not in ("auto", True, False):
        raise ValueError(
            "`augment` must be 'auto', True or False. "
            f"Received: augment={augment!r}"
        )
    if dataset:
        if augment is True:
            raise ValueError(
                "`augment=True` needs in-memory data; augment a dataset "
                "yourself. Received: augment=True"
            )
        return False
    image = x.ndim == 4 and x.shape[-1] in (1, 3)
    if augment is True and not image:
        raise ValueError(
            "`augment=True` needs images (N, H, W, 1 or 3). "
            f"Received: augment=True for inputs of shape {x.shape}"
        )
    return image if augment == "auto" else augment


def _in_memory(data, model):
    """Labelled `data` as `(x, y)` arrays (a path read for `model`)."""
    if isinstance(data, (str, os.PathLike)):
        data = batches.read(data, model)
    return batches.fixed_batches(data)[:2]


def _prepare(data, validation_data, validation_split, seed, model):
    """`(train, val)`: train `(x, y)` arrays or a dataset; val `(x, y)` or
    `None`."""
    import tensorflow as tf

    if validation_data is None:
        return split_validation(*_in_memory(data, model), validation_split,
                                seed)
    val = _in_memory(validation_data, model)
    if isinstance(data, tf.data.Dataset):
        return data, val
    return _in_memory(data, model), val


def evaluate(model, x, y, batch_size=256):
    """Accuracy and cross-entropy of a classifier on `(x, y)`.

    A sequence model (logits per token, `y` one label per token) is scored
    per token.

    What `model.evaluate` gives with `classifier_loss` and the accuracy
    metric, without compiling `model`.

    Returns:
        `(accuracy, loss)` as floats.
    """
    outputs = model.predict(x, batch_size=batch_size, verbose=0)
    predicted = np.argmax(outputs, axis=-1).ravel()  # sequences: per token
    accuracy = float(np.mean(predicted == np.ravel(y)))
    loss = float(keras.ops.convert_to_numpy(
        classifier_loss(model)(y, outputs)))
    return accuracy, loss


def fine_tune(
    model,
    data,
    *,
    teacher=None,
    epochs=3,
    validation_split=0.1,
    validation_data=None,
    learning_rate=LEARNING_RATE,
    schedule="cosine",
    warmup=0.0,
    augment=False,
    temperature=TEMPERATURE,
    alpha=ALPHA,
    batch_size=64,
    seed=0,
    verbose="auto",
    optimizer=None,
    callbacks=(),
):
    """Fine-tunes a (pruned) classifier in place and reports its accuracy.

    Trains `model` with Nesterov SGD (momentum 0.9) on the labels, and,
    with a `teacher` (the unpruned model), on the teacher's tempered
    softmax too (`keras.distillation.Distiller`, KL divergence of logits;
    a softmax output counts as the logits `log p`; the model's own losses,
    regularizers and `add_loss`, are kept, which Keras's `Distiller` drops).
    Accuracy and loss are measured on a validation split before and after.

    Args:
        model: the classifier to train, in place (its weights change).
        data: labelled data: `(x, y)` arrays, a `tf.data.Dataset` of
            `(x, y)` batches (read into memory unless `validation_data` is
            given; then trained on as it comes), an `.npz` file or an image
            folder (scaled to `[0, 1]`).
        teacher: the model to distil from, or `None` for labels only.
            Defaults to `None`.
        epochs: training epochs (0 only measures). Defaults to `3`.
        validation_split: fraction of `data` held out (seeded random
            split), ignored with `validation_data`. Defaults to `0.1`.
        validation_data: labelled validation data instead of a split.
            Defaults to `None`.
        learning_rate: the peak learning rate. Defaults to `0.03`.
        schedule: `"cosine"` (decay to 0 over the training steps) or
            `"constant"`. Defaults to `"cosine"`.
        warmup: fraction of the training steps over which the learning
            rate first rises linearly from 0 to `learning_rate`; the
            schedule runs over the remaining steps. Defaults to `0.0`.
        augment: random horizontal flip and a random crop after zero
            padding by an eighth of the height (4 pixels at 32): `True`,
            `False`, or `"auto"` (for image inputs held in memory). Defaults
            to `False`: in 3 epochs of recovery on CIFAR-10 it cost about
            half a point (`benchmarks/recovery.py`).
        temperature: distillation temperature. Defaults to `4.0`.
        alpha: weight of the distillation loss (the label loss weighs
            `1 - alpha`). Defaults to `0.5`.
        batch_size: training batch size. Defaults to `64`.
        seed: validation split, shuffle and augmentation seed. Defaults to
            `0`.
        verbose: Keras `fit` verbosity. Defaults to `"auto"`.
        optimizer: a function `learning rate (schedule) -> optimizer`, to
            train with another optimizer on the same schedule (the command
            line's C-SGD: `lambda lr: kc.CSGD(plan, learning_rate=lr)`).
            Defaults to `None` (Nesterov SGD, momentum 0.9).
        callbacks: Keras callbacks of the training; they see `model`
            itself only without a teacher (with one, `Distiller` is the
            model `fit` runs, `model` its `.student`, which
            `AsymptoticSoftFilterPruning` prunes). Defaults to `()`.

    Returns:
        A `FineTuneReport`; `report.model` is `model`, trained and compiled
        with SGD, `classifier_loss` and the accuracy metric.

    Raises:
        ValueError: a bad `epochs`, `validation_split`, `schedule`,
            `warmup`, `augment`, `temperature` or `alpha`, or a teacher
            whose input or output shape differs from the model's.

    Example:

    ```python
    small = kc.slim(model, plan)
    report = kc.fine_tune(small, (x, y), teacher=model, epochs=3)
    print(report)  # fine-tuned 3 epochs (...): validation accuracy ...
    ```
    """
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(
            f"`epochs` must be an int >= 0. Received: epochs={epochs!r}"
        )
    if schedule not in ("cosine", "constant"):
        raise ValueError(
            "`schedule` must be 'cosine' or 'constant'. "
            f"Received: schedule={schedule!r}"
        )
    checks.fraction("alpha", alpha, low_open=False)
    checks.fraction("warmup", warmup, low_open=False, high_closed=False)
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise ValueError(
            "`temperature` must be a positive number. "
            f"Received: temperature={temperature!r}"
        )
    start = time.perf_counter()
    train, val = _prepare(data, validation_data, validation_split, seed,
                          model)
    arrays = isinstance(train, tuple)
    augmented = _resolve_augment(augment, train[0] if arrays else None,
                                 not arrays)
    before = (None, None) if val is None else evaluate(model, *val)
    teacher_accuracy = None
    if teacher is not None and val is not None:
        teacher_accuracy = evaluate(teacher, *val)[0]
    if arrays:
        steps = math.ceil(len(train[0]) / batch_size)
        pipeline = kdata.make_dataset(
            *train, batch_size, shuffle=True, augment=augmented,
            pad=max(1, train[0].shape[1] // 8), seed=seed,
        )
    else:
        steps = batches.num_batches(train) or 1
        pipeline = train
    rate = learning_rate_schedule(learning_rate, schedule, epochs * steps,
                                  warmup)
    optimizer = (optimizer or _nesterov)(rate)
    if epochs:
        _train(model, teacher, pipeline, epochs, optimizer, temperature,
               alpha, verbose, list(callbacks))
    compile_classifier(model, optimizer)
    after = (None, None) if val is None else evaluate(model, *val)
    return FineTuneReport(
        accuracy_before=before[0], accuracy_after=after[0],
        loss_before=before[1], loss_after=after[1],
        teacher_accuracy=teacher_accuracy, epochs=epochs,
        distilled=teacher is not None and alpha > 0, augmented=augmented,
        train_samples=len(train[0]) if arrays else None,
        validation_samples=None if val is None else len(val[0]),
        seconds=round(time.perf_counter() - start, 1), model=model,
    )


def learning_rate_schedule(learning_rate, schedule, steps, warmup=0.0):
    """`fine_tune`'s learning rate over `steps`: a linear warm-up from 0
    over `warmup` of them, then `learning_rate` held (`"constant"`) or
    decayed to 0 on a cosine (`"cosine"`).

    Returns:
        `learning_rate` itself when constant without warm-up, else a
        `keras.optimizers.schedules.CosineDecay`.
    """
    if schedule == "constant" and not warmup:
        return learning_rate
    ramp = round(warmup * steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if ramp else learning_rate, max(1, steps - ramp),
        alpha=1.0 if schedule == "constant" else 0.0,
        warmup_target=learning_rate if ramp else None, warmup_steps=ramp)


def _nesterov(learning_rate):
    return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)


def _train(model, teacher, pipeline, epochs, optimizer, temperature, alpha,
           verbose, callbacks):
    """`model.fit`, through a `Distiller` when there is a teacher."""
    if teacher is None or alpha == 0:
        compile_classifier(model, optimizer)
        model.fit(pipeline, epochs=epochs, shuffle=False, verbose=verbose,
                  callbacks=callbacks)
        return
    trainable = teacher.trainable
    try:
        distiller = _Distiller(
            teacher, model,
            _ProbabilityLogits(temperature, outputs_probabilities(teacher),
                               outputs_probabilities(model)),
            student_loss_weight=1 - alpha,
        )
        distiller.compile(optimizer, loss=classifier_loss(model),
                          metrics=["accuracy"])
        distiller.fit(pipeline, epochs=epochs, shuffle=False,
                      verbose=verbose, callbacks=callbacks)
    finally:
        teacher.trainable = trainable
