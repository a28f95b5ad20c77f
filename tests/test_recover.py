"""Tests for `kc.fine_tune` (keras_csgd/recover.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_csgd as kc
from keras_csgd import recover
from keras_csgd.data import load_digits_images


def cnn(softmax=False):
    inputs = keras.Input((8, 8, 1))
    x = inputs
    for k, stride in enumerate((1, 2)):
        x = keras.layers.Conv2D(16, 3, stride, padding="same",
                                name=f"conv{k}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{k}")(x)
        x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, name="head", activation="softmax"
                                 if softmax else None)(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def digits():
    (x, y), _ = load_digits_images()
    return x, y


@pytest.fixture(scope="module")
def teacher(digits):
    keras.utils.set_random_seed(0)
    model = cnn()
    recover.compile_classifier(model, keras.optimizers.Adam(1e-2))
    model.fit(*digits, batch_size=64, epochs=8, verbose=0)
    return model


def slim_of(teacher):
    return kc.slim(teacher, kc.methods.magnitude_plan(teacher, keep=0.5))


def keras_evaluate(model, x, y):
    """`(accuracy, loss)` of `model.evaluate` with the classifier loss."""
    recover.compile_classifier(model)
    result = model.evaluate(x, y, verbose=0, return_dict=True)
    return result["accuracy"], result["loss"]


def test_validation_split_is_disjoint_seeded_and_sized():
    x, y = np.arange(200), np.arange(200) % 10
    (x_train, y_train), (x_val, y_val) = recover.split_validation(
        x, y, 0.1, seed=3)
    assert len(x_val) == 20 and len(x_train) == 180
    assert not set(x_train) & set(x_val)
    assert sorted([*x_train, *x_val]) == list(range(200))
    np.testing.assert_array_equal(y_val, x_val % 10)
    again = recover.split_validation(x, y, 0.1, seed=3)[1][0]
    other = recover.split_validation(x, y, 0.1, seed=4)[1][0]
    np.testing.assert_array_equal(again, x_val)
    assert set(other) != set(x_val)
    assert recover.split_validation(x, y, 0.0)[1] is None


def test_report_matches_keras_evaluate_on_the_held_out_split(digits,
                                                              teacher):
    x, y = digits
    small = slim_of(teacher)
    report = kc.fine_tune(small, (x, y), epochs=1, validation_split=0.2,
                          seed=5, augment=False, verbose=0)
    (_, _), (x_val, y_val) = recover.split_validation(x, y, 0.2, seed=5)
    assert report.model is small
    assert (report.train_samples, report.validation_samples) == (
        len(x) - len(x_val), len(x_val))
    after = keras_evaluate(small, x_val, y_val)
    before = keras_evaluate(slim_of(teacher), x_val, y_val)
    np.testing.assert_allclose(
        [report.accuracy_after, report.loss_after,
         report.accuracy_before, report.loss_before],
        [*after, *before], rtol=1e-5)
    assert report.teacher_accuracy is None and not report.distilled
    assert report.accuracy_after > report.accuracy_before
    assert "validation accuracy" in str(report) and "labels only" in str(
        report)


def test_distillation_trains_the_student_and_leaves_the_teacher(digits,
                                                                teacher):
    x, y = digits
    weights = [w.copy() for w in teacher.get_weights()]
    small = slim_of(teacher)
    report = kc.fine_tune(small, (x, y), teacher=teacher, epochs=2,
                          augment=False, verbose=0)
    (_, _), val = recover.split_validation(x, y, 0.1)
    assert report.distilled and teacher.trainable
    np.testing.assert_allclose(report.teacher_accuracy,
                               keras_evaluate(teacher, *val)[0])
    assert report.accuracy_after > report.accuracy_before
    for a, b in zip(weights, teacher.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert "teacher" in str(report)


def test_softmax_outputs_are_distilled_as_their_logits():
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(2, 16, 10)).astype("float32") * 3
    temperature = 4.0

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    p, q = softmax(teacher / temperature), softmax(student / temperature)
    expected = np.mean(np.sum(p * np.log(p / q), -1)) * temperature**2
    for soft in (False, True):
        loss = recover._ProbabilityLogits(temperature, soft, soft)
        outputs = (softmax(teacher), softmax(student)) if soft else (
            teacher, student)
        np.testing.assert_allclose(
            float(loss.compute_loss(*outputs)), expected, rtol=1e-4)
    assert recover.outputs_probabilities(cnn(softmax=True))
    assert not recover.outputs_probabilities(cnn())


def test_a_softmax_model_learns_from_a_logits_teacher(digits, teacher):
    x, y = digits
    keras.utils.set_random_seed(0)
    report = kc.fine_tune(cnn(softmax=True), (x, y), teacher=teacher,
                          epochs=2, learning_rate=0.05, augment=False,
                          verbose=0)
    assert np.isfinite(report.loss_after)
    assert report.loss_after < report.loss_before


def test_augmentation_only_for_images(digits):
    x, y = digits
    flat = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    report = kc.fine_tune(flat, (x.reshape(-1, 64), y), epochs=1,
                          augment="auto", verbose=0)
    assert not report.augmented
    with pytest.raises(ValueError, match="`augment=True` needs images"):
        kc.fine_tune(flat, (x.reshape(-1, 64), y), augment=True, verbose=0)
    report = kc.fine_tune(cnn(), (x, y), epochs=1, verbose=0)
    assert not report.augmented
    report = kc.fine_tune(cnn(), (x, y), epochs=1, augment="auto",
                          verbose=0)
    assert report.augmented and "flip/crop" in str(report)


def test_datasets_paths_and_validation_data(digits, tmp_path):
    x, y = digits
    val = (x[:100], y[:100])
    dataset = tf.data.Dataset.from_tensor_slices((x[100:], y[100:])).batch(
        64)
    report = kc.fine_tune(cnn(), dataset, validation_data=val, epochs=1,
                          verbose=0)
    assert report.train_samples is None and report.validation_samples == 100
    assert not report.augmented
    # A dataset without validation data is read and split.
    report = kc.fine_tune(cnn(), dataset, epochs=1, verbose=0)
    assert report.train_samples + report.validation_samples == len(x) - 100
    path = tmp_path / "digits.npz"
    np.savez(path, x=x, y=y)
    report = kc.fine_tune(cnn(), str(path), epochs=0, augment=False)
    assert report.validation_samples == round(0.1 * len(x))


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_rises_linearly_then_follows_the_schedule(schedule):
    steps, warmup, peak = 20, 0.25, 0.1
    rate = recover.learning_rate_schedule(peak, schedule, steps, warmup)
    got = np.array([float(rate(s)) for s in range(steps + 1)])
    ramp = np.arange(5) / 5 * peak  # 5 = warmup * steps
    decay = np.arange(16) / 15  # over the remaining 15 steps
    after = (np.full(16, peak) if schedule == "constant" else
             peak * 0.5 * (1 + np.cos(np.pi * decay)))
    np.testing.assert_allclose(got, np.r_[ramp, after], atol=1e-7)


def test_no_warmup_keeps_the_schedules():
    assert recover.learning_rate_schedule(0.1, "constant", 20) == 0.1
    rate = recover.learning_rate_schedule(0.1, "cosine", 20)
    np.testing.assert_allclose(
        [float(rate(s)) for s in (0, 10, 20)], [0.1, 0.05, 0.0], atol=1e-7)


@pytest.mark.parametrize("kwargs, name", [
    ({"epochs": -1}, "epochs"),
    ({"schedule": "linear"}, "schedule"),
    ({"alpha": 1.5}, "alpha"),
    ({"temperature": 0}, "temperature"),
    ({"validation_split": 1.0}, "validation_split"),
    ({"augment": "yes"}, "augment"),
    ({"warmup": 1.0}, "warmup"),
])
def test_bad_settings_raise_named_errors(digits, kwargs, name):
    with pytest.raises(ValueError, match=rf"`{name}.*Received: {name}="):
        kc.fine_tune(cnn(), digits, verbose=0, **kwargs)


def test_distillation_keeps_the_students_own_losses(digits, teacher):
    """Keras's Distiller drops the student's `add_loss` and regularizer
    losses; `kc.fine_tune` keeps them: an L1 kernel regularizer shrinks the
    head with a teacher as it does without one."""
    x, y = digits
    norms = {}
    for with_teacher in (False, True):
        small = slim_of(teacher)
        small.get_layer("head").kernel_regularizer = keras.regularizers.L1(
            0.05)
        small = keras.Model.from_config(small.get_config())
        small.set_weights(slim_of(teacher).get_weights())
        before = np.abs(small.get_layer("head").kernel.numpy()).sum()
        kc.fine_tune(small, (x, y), epochs=1, augment=False, verbose=0,
                     teacher=teacher if with_teacher else None, seed=0)
        norms[with_teacher] = (
            np.abs(small.get_layer("head").kernel.numpy()).sum() / before)
    # Without the regularizer's loss the head keeps 98% of its L1 norm.
    assert norms[False] < 0.7 and norms[True] < 0.7
