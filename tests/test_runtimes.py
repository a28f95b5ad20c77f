"""Runtimes: export per format, missing packages, the latency cache key,
self-checking profiles.

Outputs are compared with Keras's; profiles use an injected, deterministic
timer. No test asserts a wall-clock speed-up.
"""

import importlib
import os
import re
import warnings

import keras
import numpy as np
import pytest
from test_cli import run
from test_latency import macs_ms, tiny

import keras_csgd as kc
from keras_csgd import graph, latency, runtimes
from keras_csgd.latency import quality, sweep, timing
from keras_csgd.latency.design import width_plan
from keras_csgd.runtimes.base import relative_error
from keras_csgd.runtimes.openvino import TOLERANCES as OPENVINO_TOLERANCES

# The tolerance each format is held to: max |file - Keras| over
# max(1, max |Keras|). OpenVINO's depends on the CPU plugin's precision.
STATED = {
    "litert": 1e-4, "litert-float16": 5e-3, "litert-dynamic": 0.05,
    "litert-int8": 0.25, "onnx": 1e-4, "saved_model": 1e-4,
    "openvino": max(OPENVINO_TOLERANCES.values()),
}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    m = tiny(8)
    # Non-trivial BatchNormalization statistics, so folding them counts.
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(np.linspace(-0.2, 0.2, 8))
            layer.moving_variance.assign(np.linspace(0.5, 2.0, 8))
    return m


def path_for(folder, fmt):
    return str(folder / f"m{runtimes.for_format(fmt).suffix}")


@pytest.mark.parametrize("fmt", sorted(runtimes.FORMATS))
def test_exported_outputs_match_keras(model, fmt, tmp_path):
    result = kc.export(model, path_for(tmp_path, fmt), fmt)
    assert result.max_error <= result.tolerance <= STATED[fmt]
    runtime = runtimes.for_format(fmt)
    assert all(os.path.exists(p) for p in runtime.files(result.path))
    assert sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(p) for p in runtime.files(result.path))
    # Independent of the built-in check: other inputs, another batch size.
    x = np.random.default_rng(1).uniform(size=(5, 8, 8, 3)).astype("f4")
    program = runtime.load(result.path, threads=1, jit_compile=False)
    assert program.input_shape == (8, 8, 3)
    expected = model(x, training=False).numpy()
    assert relative_error(program.run(x), expected) <= STATED[fmt]
    # What profiling times: the quick compile computes the same function.
    quick = runtime.compile(model, threads=1, jit_compile=False)
    assert relative_error(quick.run(x), expected) <= STATED[fmt]
    assert quick.bind(x)() is not None or fmt.startswith("litert")


def test_export_refuses_bad_arguments_and_writes_nothing(model, tmp_path):
    with pytest.raises(ValueError, match="`format` must be one of"):
        kc.export(model, tmp_path / "m.onnx", "onnx-int8")
    with pytest.raises(ValueError, match=r"must end with '\.onnx'"):
        kc.export(model, tmp_path / "m.tflite", "onnx")
    with pytest.raises(ValueError, match="`sparse` applies to the LiteRT"):
        kc.export(model, tmp_path / "m.onnx", "onnx", sparse=True)
    with pytest.raises(TypeError, match="`model` must be a keras.Model"):
        kc.export("m.keras", tmp_path / "m.onnx", "onnx")
    assert os.listdir(tmp_path) == []


def test_int8_calibrates_on_data_or_random_inputs(model, tmp_path):
    data = np.random.default_rng(2).uniform(size=(32, 8, 8, 3))
    for name, kwargs in (("a", {}), ("b", {"data": data})):
        result = kc.export(model, tmp_path / f"{name}.tflite", "litert-int8",
                           **kwargs)
        assert result.max_error <= 0.25


def _missing(monkeypatch, package):
    """`import package` fails, as when it is not installed."""
    real = importlib.import_module

    def fake(name, *args):
        if name == package:
            raise ModuleNotFoundError(f"No module named {package!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)


@pytest.mark.parametrize("fmt, runtime, package, extra", [
    ("onnx", "onnxruntime", "onnxruntime", "onnx"),
    ("onnx", "onnxruntime", "tf2onnx", "onnx"),
    ("openvino", "openvino", "openvino", "openvino"),
])
def test_a_missing_package_is_named_with_its_extra(
    model, fmt, runtime, package, extra, monkeypatch, tmp_path, capsys
):
    _missing(monkeypatch, package)
    message = rf"`{package}`: pip install keras-csgd\[{extra}\]"
    with pytest.raises(ImportError, match=message):
        kc.export(model, path_for(tmp_path, fmt), fmt)
    with pytest.raises(ImportError, match=message):
        latency.profile(model, runtime, measure=lambda m: 1.0, verbose=0)
    with pytest.raises(ImportError, match=message):
        kc.benchmark_latency(model, runtime=runtime, runs=1)
    saved = tmp_path / "m.keras"
    model.save(saved)
    code, _, err = run(["export", str(saved), "--format", fmt, "--out",
                        path_for(tmp_path, fmt)], capsys)
    assert code == 2 and re.search(message, err)
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]


class FakeTimer:
    """Stands in for `sweep.Timer`: MACs as latency, plus noise of
    `NOISE[k]` of the full latency in the `k`-th measurement (seeded)."""

    NOISE = [0.0]
    made = 0

    def __init__(self, model, *args):
        sigma = self.NOISE[min(FakeTimer.made, len(self.NOISE) - 1)]
        self.rng = np.random.default_rng(FakeTimer.made)
        FakeTimer.made += 1
        self.full = macs_ms(model)
        self.sigma = sigma

    def change(self, name, build):
        return (macs_ms(build()) / self.full - 1
                + self.rng.normal(0, self.sigma)), self.full

    def close(self):
        pass


@pytest.fixture
def fake_timer(monkeypatch):
    monkeypatch.setattr(sweep, "Timer", FakeTimer)
    monkeypatch.setattr(FakeTimer, "made", 0)
    monkeypatch.setattr(FakeTimer, "NOISE", [0.0])
    return FakeTimer


def test_the_cache_misses_when_the_runtime_or_its_version_changes(
    model, fake_timer, tmp_path, monkeypatch
):
    args = dict(cache_dir=tmp_path, verbose=0, threads=1)
    first = latency.profile(model, "onnxruntime", **args)
    assert not first.cached and first.fields["checks"]["clean"]
    assert first.fields["versions"]["onnxruntime"]
    assert latency.profile(model, "onnxruntime", **args).cached
    assert not latency.profile(model, "openvino", **args).cached
    assert not latency.profile(model, "litert-int8", **args).cached
    monkeypatch.setattr(runtimes.OnnxRuntime, "versions",
                        lambda self: {"onnxruntime": "0.0.1"})
    assert not latency.profile(model, "onnxruntime", **args).cached
    assert len(os.listdir(tmp_path)) == 4


def test_a_noisy_profile_is_measured_again(model, fake_timer, tmp_path):
    """The first measurement is noisy (25% of the full latency), the second
    clean: the clean one is kept and cached."""
    fake_timer.NOISE = [0.25, 0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = latency.profile(model, "litert", cache_dir=tmp_path,
                                verbose=0)
    assert fake_timer.made == 2
    assert table.fields["checks"] == {"clean": True, "attempts": 2,
                                      "problems": []}
    assert table.fields["fit_rms_ms"] < 1e-6
    assert table.fields["runtime_effects"] == []
    assert latency.profile(model, "litert", cache_dir=tmp_path,
                           verbose=0).cached


def test_a_profile_that_stays_noisy_says_so(model, fake_timer, tmp_path):
    fake_timer.NOISE = [0.25]
    with pytest.warns(UserWarning, match="failed its checks in 2 measure"):
        table = latency.profile(model, "litert", cache_dir=tmp_path,
                                verbose=0)
    checks = table.fields["checks"]
    assert not checks["clean"] and checks["attempts"] == 2
    assert checks["problems"]
    # The mean of the two measurements has the least noise: it is kept.
    assert table.fields["measurements_averaged"] == 2
    # The cached noisy table is not reused: measured again (still noisy:
    # 2 more measurements), the best of the four is kept and cached.
    fake_timer.made = 0
    with pytest.warns(UserWarning, match="failed its checks in 4 measure"):
        again = latency.profile(model, "litert", cache_dir=tmp_path,
                                verbose=0)
    assert fake_timer.made == 2 and not again.cached
    assert again.fields["fit_rms_ms"] <= table.fields["fit_rms_ms"]
    # Failed in two calls: its problems hold here; read back, with a warning.
    fake_timer.made = 0
    with pytest.warns(UserWarning, match="failed its checks in 4 measure"):
        third = latency.profile(model, "litert", cache_dir=tmp_path,
                                verbose=0)
    assert third.cached and fake_timer.made == 0
    # One measurement only when asked.
    fake_timer.made = 0
    with pytest.warns(UserWarning, match="in 1 measurements"):
        latency.profile(model, "openvino", cache_dir=tmp_path, verbose=0,
                        attempts=1)
    assert fake_timer.made == 1


def test_a_tables_checks_allow_the_runtimes_own_noise(model, fake_timer,
                                                     tmp_path, monkeypatch):
    """TensorFlow's calls vary twice as much as LiteRT's by themselves:
    its tables' checks allow 6% of the full latency, the others' 3%, and
    `max_error` overrides both."""
    allowed, problems = [], quality.problems

    def recording(table, held_out=(), max_error=quality.MAX_ERROR, *args,
                  **kwargs):
        allowed.append(max_error)
        return problems(table, held_out, max_error, *args, **kwargs)

    monkeypatch.setattr(quality, "problems", recording)
    for runtime, max_error, expected in (("tensorflow", None, 0.06),
                                         ("litert", None, 0.03),
                                         ("tensorflow", 0.01, 0.01)):
        allowed.clear()
        latency.profile(model, runtime, cache_dir=tmp_path, verbose=0,
                        max_error=max_error)
        assert set(allowed) == {expected}
        tmp_path = tmp_path / "other"


def test_a_noisy_cached_profile_is_replaced_once_quiet(model, fake_timer,
                                                       tmp_path):
    fake_timer.NOISE = [0.25]
    with pytest.warns(UserWarning, match="failed its checks in 2 measure"):
        latency.profile(model, "litert", cache_dir=tmp_path, verbose=0)
    fake_timer.made, fake_timer.NOISE = 0, [0.0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = latency.profile(model, "litert", cache_dir=tmp_path,
                                verbose=0)
    assert fake_timer.made == 1 and not clean.cached
    assert clean.fields["checks"] == {"clean": True, "attempts": 3,
                                      "problems": []}
    assert latency.profile(model, "litert", cache_dir=tmp_path,
                           verbose=0).cached


def test_quality_names_each_problem():
    table = latency.LatencyTable(
        10.0,
        {"a": {"size": 8, "widths": [6, 4], "ms": [9.0, 10.5]},
         "b": {"size": 8, "widths": [4], "ms": [8.0]}},
        {"blk": {"saving_ms": -0.5, "groups": ["b"]}},
        fields={"fit_rms_ms": 0.5},
    )
    found = quality.problems(table, [({"b": 4}, -0.5)])
    assert len(found) == 4
    for words in ("RMS residual is 0.5 ms", "held-out variants miss",
                  "'a' measures 1.5 ms slower at width 4",
                  "removing block 'blk' costs 0.5 ms"):
        assert any(words in p for p in found), (words, found)
    assert quality.problems(table, [({"b": 4}, -2.0)], max_error=0.2) == []


def test_order_violations_beyond_noise_are_the_runtimes():
    """A narrower width slower by 1.5 ms of 10: with standard errors of
    0.1 ms it is the runtime's (listed, not a problem); with 1 ms, noise."""
    table = latency.LatencyTable(
        10.0, {"a": {"size": 8, "widths": [6, 4], "ms": [9.0, 10.5]}},
        fields={"fit_rms_ms": 0.05})
    sharp = {"a": {6: 0.1, 4: 0.1}}
    assert quality.problems(table, errors=sharp) == []
    kept = quality.runtime_effects(table, sharp)
    assert len(kept) == 1 and "at width 4 than at 6 (11 standard" in kept[0]
    vague = {"a": {6: 1.0, 4: 1.0}}
    assert quality.runtime_effects(table, vague) == []
    (problem,) = quality.problems(table, errors=vague)
    assert "'a' measures 1.5 ms slower at width 4" in problem
    # Slower in every one of several measurements: the runtime's too.
    assert quality.slower_widths(table) == {("a", 4)}
    assert quality.problems(table, errors=vague, reproduced={("a", 4)}) == []
    (kept,) = quality.runtime_effects(table, vague, reproduced={("a", 4)})
    assert kept.endswith("at width 4 than at 6 (in every measurement)")
    # Slower in every measurement at another width: still noise here.
    assert quality.problems(table, errors=vague, reproduced={("a", 6)})


class PhasedPair:
    """Stands in for `timing.Pair`: MACs as latency, every third variant
    timed (with its full model) in a phase where the machine runs 1.45x
    slower."""

    def __init__(self, model, *args, path=None):
        self.full, self.made = macs_ms(model), 0

    def timed(self, variant, path=None, slot="variant"):
        return variant

    def against(self, variant, path=None):
        return self.compare(self.timed(variant, path))

    def compare(self, variant):
        self.made += 1
        phase = 1.45 if self.made % 3 == 0 else 1.0
        first, second = self.full * phase, macs_ms(variant) * phase
        return {"first_ms": first, "second_ms": second,
                "delta_ms": second - first, "ratio": second / first}

    def close(self):
        pass


def assert_exact(table, model):
    """`table` is the exact MACs-as-latency table of `model`."""
    assert table.fields["fit_rms_ms"] < 1e-9
    assert table.full == pytest.approx(macs_ms(model))
    an = graph.analyze(model)
    widths = {g.name: g.size // 2 for g in an.groups if g.prunable}
    narrow = kc.slim(model, width_plan(model, an, widths))
    assert table.predict(widths) == pytest.approx(macs_ms(narrow), rel=1e-6)


def test_slow_phases_of_the_machine_cancel(model, monkeypatch, tmp_path):
    """Each variant's change is its ratio to the full model timed with it:
    phases that slow both leave the table exact."""
    monkeypatch.setattr(timing, "Pair", PhasedPair)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table = latency.profile(model, "tensorflow", cache_dir=tmp_path,
                                verbose=0)
    assert table.fields["checks"]["clean"]
    assert_exact(table, model)


class FoldCheckingPair(PhasedPair):
    """`PhasedPair` that records the normalization layers of every model
    it is given."""

    normalizations = []

    def __init__(self, model, *args, path=None):
        super().__init__(model, *args, path=path)
        self.timed(model)

    def timed(self, variant, path=None, slot="variant"):
        FoldCheckingPair.normalizations.append(sum(
            isinstance(layer, keras.layers.BatchNormalization)
            for layer in variant.layers))
        return variant


def test_tensorflow_profiles_variants_of_the_folded_model(model, monkeypatch,
                                                         tmp_path):
    """TensorFlow serves the BN-folded model (`Runtime.served`): its
    variants are slimmed from it, with the same group names, and compile
    without a second fold; the table is the unfolded model's."""
    tf_runtime = runtimes.get("tensorflow")
    folded = tf_runtime.served(model)
    assert tf_runtime.served(folded) is folded
    # A BN after an Add does not fold: served once, then left as it is.
    x = keras.Input((8, 8, 3))
    h = keras.layers.BatchNormalization()(keras.layers.Conv2D(4, 3)(x))
    h = keras.layers.Add()([h, keras.layers.Conv2D(4, 3)(x)])
    h = keras.layers.BatchNormalization()(h)
    preact = tf_runtime.served(keras.Model(x, h))
    assert sum(isinstance(layer, keras.layers.BatchNormalization)
               for layer in preact.layers) == 1
    assert tf_runtime.served(preact) is preact
    assert [g.name for g in kc.channel_groups(folded)] == [
        g.name for g in kc.channel_groups(model)]
    x = np.random.default_rng(2).uniform(size=(3, 8, 8, 3)).astype("f4")
    assert relative_error(folded(x), model(x, training=False)) < 1e-5
    monkeypatch.setattr(timing, "Pair", FoldCheckingPair)
    FoldCheckingPair.normalizations = []
    table = latency.profile(model, "tensorflow", cache_dir=tmp_path,
                            verbose=0)
    assert len(FoldCheckingPair.normalizations) > 3
    assert not any(FoldCheckingPair.normalizations)
    assert_exact(table, model)
    # A served model whose groups differ is not used: the model itself is.
    monkeypatch.setattr(type(tf_runtime), "served",
                        lambda self, m: tiny(4))
    table = latency.profile(model, "tensorflow", cache_dir=tmp_path / "b",
                            verbose=0)
    assert_exact(table, model)


class StretchPair(PhasedPair):
    """Stands in for `timing.Pair`: MACs as latency, the 3rd to 6th
    timings in a slow phase that slows the full model 1.6x and the variants
    2.1x (ONNX Runtime's MobileNetV2 at 128x128 and its slim variants on a
    quiet VM, `benchmarks/results/timing_noise_*.json`)."""

    def compare(self, variant):
        self.made += 1
        slow = 3 <= self.made <= 6
        first = self.full * (1.6 if slow else 1.0)
        second = macs_ms(variant) * (2.1 if slow else 1.0)
        return {"first_ms": first, "second_ms": second,
                "delta_ms": second - first, "ratio": second / first}


def test_variants_timed_in_a_slow_phase_are_timed_again(model, monkeypatch,
                                                        tmp_path):
    """A phase that slows the variants more than the full model skews
    their ratios; timed again after the others, they are exact."""
    monkeypatch.setattr(timing, "Pair", StretchPair)
    args = dict(runtime="tensorflow", attempts=1, verbose=0)
    retimes = timing.RETIMES
    monkeypatch.setattr(timing, "RETIMES", 0)
    with pytest.warns(UserWarning, match="failed its checks"):
        skewed = latency.profile(model, cache_dir=tmp_path / "0", **args)
    assert skewed.fields["fit_rms_ms"] > 0.05 * skewed.full
    monkeypatch.setattr(timing, "RETIMES", retimes)
    table = latency.profile(model, cache_dir=tmp_path / "1", **args)
    assert table.fields["checks"]["clean"]
    assert_exact(table, model)


def test_predictions_are_never_negative_and_keep_their_order():
    table = latency.LatencyTable(
        1.0, {"a": {"size": 8, "widths": [4, 2], "ms": [0.4, 0.2]},
              "b": {"size": 8, "widths": [4, 2], "ms": [0.3, 0.1]}})
    ms = [table.predict({"a": a, "b": b}) for a, b in
          ((8, 8), (4, 8), (4, 4), (2, 4), (2, 2))]
    assert np.all(np.diff(ms) < 0) and min(ms) > 0
    assert table.predict({"a": 4}) == pytest.approx(0.4)  # above the floor
    for raw in (0.5, 0.04, -0.3, -2.0):
        assert table.additive(table.floored(raw)) == pytest.approx(raw)


@pytest.mark.parametrize("runtime", ["litert-int8", "onnxruntime"])
def test_plans_with_an_injected_cost_are_deterministic(model, runtime):
    plans = [kc.plan_for_latency(model, 0.6, runtime, measure=macs_ms,
                                 return_report=True, verbose=0)
             for _ in range(2)]
    (plan, report), (again, _) = plans
    assert plan.to_json() == again.to_json()
    assert report.runtime == runtime and report.met
    assert report.predicted_ms > 0


@pytest.mark.parametrize("runtime", ["litert-int8", "onnxruntime",
                                     "openvino"])
def test_time_against_full_runs_the_exported_files(model, runtime):
    slim = kc.slim(model, width_plan(model, graph.analyze(model),
                                     {"stem": 4, "b_conv1": 4}))
    full_ms, slim_ms, ratio = kc.latency.time_against_full(
        model, slim, runtime, threads=1)
    assert full_ms > 0 and slim_ms > 0
    assert ratio == pytest.approx(slim_ms / full_ms)


@pytest.mark.filterwarnings("ignore:TensorFlow is already initialised")
def test_cli_exports_and_benches_every_format(model, tmp_path, capsys):
    saved = tmp_path / "m.keras"
    model.save(saved)
    code, _, err = run(["export", str(saved), "--format", "litert-int8",
                        "--out", str(tmp_path / "q.tflite")], capsys)
    assert code == 2 and "needs --data" in err
    for fmt in ("onnx", "openvino", "saved_model"):
        out = path_for(tmp_path, fmt)
        code, stdout, err = run(["export", str(saved), "--format", fmt,
                                 "--out", out], capsys)
        assert code == 0, err
        assert stdout.startswith(f"wrote {out} ({fmt})")
        code, stdout, err = run(["bench", out, "--runs", "2",
                                 "--batch-sizes", "1,2"], capsys)
        assert code == 0, err
        assert [line.split()[0] for line in stdout.splitlines()] == [
            "batch", "1", "2"]
    code, stdout, err = run(["bench", str(saved), "--runtime", "onnxruntime",
                             "--runs", "2", "--batch-sizes", "1"], capsys)
    assert code == 0, err


class SlowPhasePair:
    """Stands in for `timing.Pair`: the first timing falls in a slow phase
    (full model 1.6x, its ratio off), the next ones do not."""

    made = []

    def __init__(self, model, *args, **kwargs):
        self.timings = 0

    def against(self, variant, path=None):
        self.timings += 1
        SlowPhasePair.made.append(self.timings)
        if self.timings == 1:
            return {"first_ms": 1.6, "second_ms": 0.56, "ratio": 0.35}
        return {"first_ms": 1.0, "second_ms": 0.3, "ratio": 0.3}

    def close(self):
        pass


def test_a_verification_in_a_slow_phase_is_timed_again(model, monkeypatch,
                                                        tmp_path):
    verify = importlib.import_module("keras_csgd.latency.verify")
    monkeypatch.setattr(verify.timing, "Pair", SlowPhasePair)
    monkeypatch.setattr(SlowPhasePair, "made", [])
    args = (model, "tensorflow", 1, 1, False, None, str(tmp_path))
    with verify.Verifier(*args, full_ms=1.0) as verifier:
        assert verifier(model, "a") == (1.0, 0.3, 0.3)
        assert verifier(model, "b") == (1.0, 0.3, 0.3)
    assert SlowPhasePair.made == [1, 2, 3]  # the first timed twice
    # Without a known full latency the first timing is the reference.
    SlowPhasePair.made = []
    with verify.Verifier(*args) as verifier:
        assert verifier(model, "a") == (1.6, 0.56, 0.35)
    assert SlowPhasePair.made == [1]
