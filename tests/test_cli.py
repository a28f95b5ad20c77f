"""Tests for the `keras-csgd` command line."""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest

import keras_csgd as kc
from keras_csgd import cli
from keras_csgd.data import load_digits_images
from keras_csgd.models import small_resnet


def run(argv, capsys):
    """`(exit code, stdout, stderr)` of `keras-csgd argv` in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A briefly trained small model (.keras) and digits as .npz."""
    root = tmp_path_factory.mktemp("cli")
    (x, y), (x_test, _) = load_digits_images()
    keras.utils.set_random_seed(0)
    model = small_resnet(width=4)
    model.compile(
        keras.optimizers.Adam(1e-2),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=64, epochs=1, verbose=0)
    model_path = root / "model.keras"
    model.save(model_path)
    data_path = root / "digits.npz"
    np.savez(data_path, x=x[:256], y=y[:256])
    return {"model": str(model_path), "data": str(data_path), "x": x_test}


@pytest.mark.parametrize("command", [[], ["demo"], ["prune"], ["export"],
                                     ["bench"]])
def test_help(command, capsys):
    code, out, _ = run(command + ["--help"], capsys)
    assert code == 0
    assert out.startswith("usage: keras-csgd")
    for sub in command:
        assert f"keras-csgd {sub}" in out


def _bad_inputs(files, tmp):
    """`(argv, expected part of the error line)` for bad command lines."""
    model, data = files["model"], files["data"]
    not_keras = tmp / "text.keras"
    not_keras.write_text("not a model")
    out = str(tmp / "out" / "slim.keras")
    tfl = str(tmp / "out" / "m.tflite")
    missing = str(tmp / "missing")
    mag = ["prune", "--method", "magnitude"]
    return [
        (mag + [missing + ".keras", "--out", out], "not an existing"),
        (mag + [str(not_keras), "--out", out], "not a loadable Keras model"),
        (mag + [model, "--keep", "0", "--out", out], "--keep: must be a"),
        (mag + [model, "--keep", "1.5", "--out", out], "--keep: must be a"),
        (mag + [model, "--keep", "half", "--out", out], "--keep: must be a"),
        (["prune", model, "--method", "magic", "--out", out], "invalid choice"),
        (["prune", model, "--out", out], "required: --method"),
        (mag + [model, "--data", missing, "--out", out], "does not exist"),
        (
            mag + [model, "--data", str(tmp / "out"), "--out", out],
            "must contain class subfolders",
        ),
        (["prune", model, "--method", "csgd", "--out", out], "needs --data"),
        (mag + [model, "--epochs", "2", "--out", out], "--epochs needs --data"),
        (mag + [model, "--val-split", "1", "--out", out],
         "--val-split: must be a fraction in [0, 1)"),
        (
            mag + [model, "--out", str(tmp / "no" / "s.keras")],
            "does not exist or is not writable",
        ),
        (mag + [model, "--out", str(tmp / "out" / "s.h5")], "end with .keras"),
        (mag + [model, "--out", model], "must differ"),
        (mag + [model], "required: --out"),
        (["export", model, "--out", tfl, "--quantize", "int8"], "needs --data"),
        (["export", model, "--out", missing + "/m.tflite"], "not writable"),
        (["export", str(not_keras), "--out", tfl], "not a loadable"),
        (["export", model, "--out", tfl, "--quantize", "q"], "invalid choice"),
        (["bench", missing + ".tflite"], "not an existing file"),
        (["bench", model, "--batch-sizes", "1,x"], "positive integer"),
        (["bench", model, "--runs", "0"], "positive integer"),
        (
            ["demo", "--dataset", "cifar10", "--data-dir", missing, "--out",
             str(tmp / "out" / "demo")],
            "is not a folder",
        ),
        (
            ["demo", "--data-dir", str(tmp), "--out", str(tmp / "out" / "d")],
            "needs --dataset cifar10",
        ),
        (["demo", "--latency", "2"], "--latency"),
        (["demo", "--out", data], "is not a folder"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ]


def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    files, tmp_path, capsys
):
    (tmp_path / "out").mkdir()
    weights = keras.saving.load_model(files["model"]).get_weights()
    for argv, message in _bad_inputs(files, tmp_path):
        code, _, err = run(argv, capsys)
        assert code == 2, argv
        lines = err.strip().splitlines()
        assert len(lines) == 1, (argv, err)
        assert lines[0].startswith("keras-csgd: error: "), argv
        assert message in lines[0], (argv, lines[0])
        assert list((tmp_path / "out").iterdir()) == [], argv
    # The input model file is untouched.
    after = keras.saving.load_model(files["model"]).get_weights()
    for a, b in zip(weights, after):
        np.testing.assert_array_equal(a, b)


def test_console_script_reports_one_error_line(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "keras-csgd")
    result = subprocess.run(
        [script, "bench", str(tmp_path / "missing.tflite")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("keras-csgd: error: ") and "missing" in last


def test_prune_magnitude_then_export_and_bench(files, tmp_path, capsys):
    out = str(tmp_path / "slim.keras")
    code, stdout, _ = run(
        ["prune", files["model"], "--method", "magnitude", "--keep", "0.5",
         "--out", out],
        capsys,
    )
    assert code == 0, stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "slim.keras",
        "slim.plan.json",
    ]
    model = keras.saving.load_model(files["model"])
    slim = keras.saving.load_model(out)
    plan = kc.PruningPlan.from_json((tmp_path / "slim.plan.json").read_text())
    assert plan.clusters == kc.methods.magnitude_plan(model, keep=0.5).clusters
    reference = kc.slim(model, plan)
    np.testing.assert_allclose(
        slim.predict(files["x"], verbose=0),
        reference.predict(files["x"], verbose=0),
        atol=1e-5,
    )
    assert kc.count_macs(slim) < 0.4 * kc.count_macs(model)

    tflite = str(tmp_path / "slim.tflite")
    code, stdout, _ = run(["export", out, "--out", tflite], capsys)
    assert code == 0 and "max relative error" in stdout
    np.testing.assert_allclose(
        kc.runtimes.litert.run_tflite(tflite, files["x"][:20]),
        slim.predict(files["x"][:20], verbose=0),
        atol=1e-4,
    )
    code, stdout, _ = run(
        ["export", out, "--out", str(tmp_path / "q.tflite"), "--quantize",
         "int8", "--data", files["data"]],
        capsys,
    )
    assert code == 0 and os.path.isfile(tmp_path / "q.tflite")
    for target in (tflite, out):
        code, stdout, _ = run(
            ["bench", target, "--batch-sizes", "1,8", "--runs", "3"], capsys
        )
        assert code == 0
        rows = stdout.strip().splitlines()
        assert rows[0].split() == ["batch", "median", "ms", "p10", "ms",
                                   "p90", "ms"]
        assert [r.split()[0] for r in rows[1:]] == ["1", "8"]


def test_prune_csgd_with_data(files, tmp_path, capsys):
    out = str(tmp_path / "slim.keras")
    code, stdout, err = run(
        ["prune", files["model"], "--method", "csgd", "--keep", "0.5",
         "--data", files["data"], "--epochs", "1", "--out", out],
        capsys,
    )
    assert code == 0, err
    slim = keras.saving.load_model(out)
    plan = kc.PruningPlan.from_json((tmp_path / "slim.plan.json").read_text())
    model = keras.saving.load_model(files["model"])
    assert plan.clusters == kc.make_plan(model, 0.5, "kmeans").clusters
    assert slim.get_layer("stem_conv").filters == 2
    assert "MACs" in stdout


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    code, stdout, err = run(
        ["demo", "--base-epochs", "4", "--size", "16", "--out", str(out)],
        capsys,
    )
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {
        "slim.keras", "slim.tflite", "plan.json"}
    table = {
        cells[0]: cells[1:]
        for cells in (
            re.split(r"\s{2,}", line.strip()) for line in stdout.splitlines()
        )
    }
    trained, csgd, slim = map(float, table["accuracy (%)"])
    assert slim == csgd and trained > 90
    agreement = re.search(r"argmax agreement ([\d.]+)%, max logit "
                          r"difference ([\d.e+-]+)", stdout)
    assert float(agreement.group(1)) == 100.0
    assert float(agreement.group(2)) < 1e-4
    full, small = (int(v.replace(",", "")) for v in table["MACs"])
    assert small < full
    plan = kc.PruningPlan.from_json((out / "plan.json").read_text())
    assert slim_model_matches(out / "slim.keras", plan)


def slim_model_matches(path, plan):
    """The saved slim model has the plan's widths."""
    model = keras.saving.load_model(path)
    return all(model.get_layer(name).filters == width
               for name, width in plan.widths().items())


def _prune(files, tmp_path, capsys, method, *extra):
    """Runs `prune --method method` on the module's model; `(model, slim,
    plan)` with the input model loaded back from its file."""
    out = str(tmp_path / "slim.keras")
    code, stdout, err = run(
        ["prune", files["model"], "--method", method, "--keep", "0.5",
         "--data", files["data"], "--epochs", "1", "--out", out, *extra],
        capsys,
    )
    assert code == 0, err
    assert f"{method}: MACs" in stdout
    plan = kc.PruningPlan.from_json((tmp_path / "slim.plan.json").read_text())
    return (keras.saving.load_model(files["model"]),
            keras.saving.load_model(out), plan)


def test_prune_gsm_keeps_the_density_of_kernel_weights(files, tmp_path,
                                                       capsys):
    model, slim, plan = _prune(files, tmp_path, capsys, "gsm")
    assert plan.clusters == {}
    assert kc.count_macs(slim) == kc.count_macs(model)
    kernels = [w for w in slim.weights if w.path.endswith("kernel")]
    nonzero = sum(int(np.count_nonzero(w.numpy())) for w in kernels)
    total = sum(int(np.prod(w.shape)) for w in kernels)
    assert 0 < nonzero <= 0.5 * total + 1


def test_prune_cap_compensates_the_magnitude_plan(files, tmp_path, capsys):
    model, slim, plan = _prune(files, tmp_path, capsys, "cap", "--epochs",
                               "0")
    assert plan.clusters == kc.methods.magnitude_plan(
        model, keep=0.5).clusters
    (x, _), _ = validation_split(files)  # CaP sees the training part
    stats = kc.methods.compensation.collect_statistics(model, x, verbose=0)
    reference = kc.methods.compensation.compensate(model, plan, stats)
    np.testing.assert_allclose(
        slim.predict(files["x"], verbose=0),
        reference.predict(files["x"], verbose=0),
        atol=1e-4,
    )


def test_prune_adaptive_slims_its_gated_model_exactly_then_fine_tunes(
    files, tmp_path, capsys
):
    out = str(tmp_path / "slim.keras")
    code, stdout, err = run(
        ["prune", files["model"], "--method", "adaptive", "--keep", "0.5",
         "--data", files["data"], "--epochs", "1", "--out", out], capsys)
    assert code == 0, err
    model, slim = (keras.saving.load_model(p) for p in (files["model"], out))
    plan = kc.PruningPlan.from_json((tmp_path / "slim.plan.json").read_text())
    # The gates lock by the MACs of --keep 0.5 per group; the slim model is
    # the plan applied.
    target = kc.macs_under(model, kc.make_plan(model, keep=0.5))
    assert kc.count_macs(slim) == kc.macs_under(model, plan)
    assert target <= kc.count_macs(slim) < kc.count_macs(model)
    # Before fine-tuning, the slim model is the gated one, exactly.
    agreement = re.search(r"\(before fine-tuning\): argmax agreement "
                          r"([\d.]+)%, max logit difference ([\d.e+-]+)",
                          stdout)
    assert float(agreement.group(1)) == 100.0
    assert float(agreement.group(2)) < 1e-4
    printed = printed_accuracies(stdout)
    assert printed.keys() == {"input", "trained", "slim", "tuned"}
    assert printed["trained"] == printed["slim"]
    (_, _), (x_val, y_val) = validation_split(files)
    assert abs(printed["tuned"] - evaluated(slim, x_val, y_val)) <= 5e-5


def validation_split(files):
    """The `(train, val)` split `prune` makes of the module's data."""
    with np.load(files["data"]) as arrays:
        x, y = arrays["x"].astype("float32"), arrays["y"]
    return kc.recover.split_validation(x, y, 0.1, seed=0)


def printed_accuracies(stdout):
    """`{what: accuracy}` of the line `accuracy on the N held-out ...`."""
    line = next(line for line in stdout.splitlines()
                if line.startswith("accuracy on the "))
    found = {"input": r"input model ([\d.]+)%",
             "trained": r"trained model ([\d.]+)%",
             "slim": r"slim model ([\d.]+)%",
             "tuned": r"fine-tuning, ([\d.]+)% after"}
    return {name: float(m.group(1)) / 100 for name, pattern in found.items()
            if (m := re.search(pattern, line))}


def evaluated(model, x, y):
    """The accuracy `model.evaluate` gives."""
    kc.recover.compile_classifier(model)
    return model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"]


def test_prune_prints_the_accuracies_evaluate_gives(files, tmp_path,
                                                    capsys):
    out = str(tmp_path / "slim.keras")
    code, stdout, err = run(
        ["prune", files["model"], "--method", "magnitude", "--keep", "0.5",
         "--data", files["data"], "--epochs", "1", "--out", out], capsys)
    assert code == 0, err
    model = keras.saving.load_model(files["model"])
    plan = kc.PruningPlan.from_json((tmp_path / "slim.plan.json").read_text())
    (_, _), (x_val, y_val) = validation_split(files)
    assert f"held out {len(x_val)} of 256 samples" in stdout
    printed = printed_accuracies(stdout)
    expected = {
        "input": evaluated(model, x_val, y_val),
        "slim": evaluated(kc.slim(model, plan), x_val, y_val),
        "tuned": evaluated(keras.saving.load_model(out), x_val, y_val),
    }
    assert printed.keys() == expected.keys()
    for name, value in expected.items():
        assert abs(printed[name] - value) <= 5e-5, (name, stdout)


def test_prune_csgd_prints_trained_and_slim_accuracy_and_agreement(
        files, tmp_path, capsys):
    out = str(tmp_path / "slim.keras")
    code, stdout, err = run(
        ["prune", files["model"], "--method", "csgd", "--keep", "0.5",
         "--data", files["data"], "--epochs", "1", "--out", out], capsys)
    assert code == 0, err
    (_, _), (x_val, y_val) = validation_split(files)
    printed = printed_accuracies(stdout)
    assert printed.keys() == {"input", "trained", "slim"}
    model = keras.saving.load_model(files["model"])
    for name, written in (("input", model),
                          ("slim", keras.saving.load_model(out))):
        assert abs(printed[name] - evaluated(written, x_val, y_val)) <= 5e-5
    agreement = re.search(r"argmax agreement ([\d.]+)%, max logit "
                          r"difference ([\d.e+-]+)", stdout)
    assert agreement and 0 <= float(agreement.group(1)) <= 100


def test_ensembles_score_a_bounded_sample_and_val_split_0_skips_accuracy(
        files, tmp_path, capsys):
    code, stdout, err = run(
        ["prune", files["model"], "--method", "ensembles", "--keep", "0.5",
         "--data", files["data"], "--ensemble-images", "50", "--val-split",
         "0", "--out", str(tmp_path / "slim.keras")], capsys)
    assert code == 0, err
    assert "scoring on 50 of 256 samples" in stdout
    assert "held out" not in stdout and "accuracy on" not in stdout


@pytest.mark.parametrize("method", sorted(cli.PLANNED))
def test_prune_plan_makers_run(files, tmp_path, capsys, method):
    model, slim, plan = _prune(files, tmp_path, capsys, method, "--epochs",
                               "0")
    assert plan.clusters
    assert kc.count_macs(slim) == kc.macs_under(model, plan)


def test_methods_map_names_to_functions():
    assert set(cli.METHODS) == {
        "csgd", "asfp", "gsm", "adaptive", "magnitude", "similarity",
        "functionality", "ensembles", "cap",
    }
    assert all(callable(f) for f in cli.METHODS.values())


# The console script enters through `keras_csgd_cli`, which silences
# TensorFlow's import-time lines (keras_csgd/__init__ imports TensorFlow).
def test_console_script_prints_no_tensorflow_noise(files, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "keras-csgd")
    result = subprocess.run(
        [script, "export", files["model"], "--out",
         str(tmp_path / "m.tflite")],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr
    noise = [line for line in result.stderr.splitlines()
             if re.search(r"oneDNN|cuda|absl|tensorflow|I0000|W0000",
                          line, re.IGNORECASE)]
    assert noise == []
