"""`keras-csgd prune --latency` and `keras-csgd profile`.

Real (tiny) profiling runs on TensorFlow into a temporary cache; no test
asserts a speed-up, only what is printed and written.
"""

import json
import re

import keras
import numpy as np
import pytest
from test_cli import run

import keras_csgd as kc
from keras_csgd import latency
from keras_csgd.cli import adaptive
from keras_csgd.models import small_resnet


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    """A small residual CNN saved as .keras; one latency cache in tmp."""
    root = tmp_path_factory.mktemp("cli_latency")
    keras.utils.set_random_seed(0)
    path = root / "model.keras"
    small_resnet(width=16).save(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_CSGD_CACHE", str(root / "cache"))
        # Tiny models timed for real on a CI machine: a table that fails
        # its quality checks would be measured again, not read back from
        # the cache; the checks are tested with injected timings elsewhere.
        patch.setattr(latency.quality, "problems", lambda *a, **k: [])
        yield str(path)


FAST = ["--runtime", "tensorflow", "--batch-size", "64"]


def test_profile_prints_shares_then_reads_the_cache(model_path, capsys):
    argv = ["profile", model_path, "--runtime", "tensorflow",
            "--batch-size", "32"]  # a key no other test measures
    code, out, _ = run(argv, capsys)
    assert code == 0, out
    lines = out.strip().splitlines()
    assert "(measured)" in lines[0] and "per batch of 32" in lines[0]
    assert lines[1].startswith("machine: ") and "cores, SIMD" in lines[1]
    lines = lines[:1] + lines[2:]
    assert lines[1].split() == ["group", "or", "block", "kind", "share", "of",
                                "latency"]
    model = keras.saving.load_model(model_path)
    prunable = {g.name for g in kc.channel_groups(model) if g.prunable}
    named = {line.split()[0] for line in lines[2:]}
    assert named >= prunable
    for line in lines[2:]:
        assert re.fullmatch(r"\S+\s+(group|block)\s+\d+\.\d%", line.strip())
    code, out, _ = run(argv, capsys)
    assert code == 0 and "(cache)" in out.splitlines()[0]


def prune_to_90_percent(model_path, tmp_path, capsys, *argv):
    """Runs `prune --latency 0.9` on TensorFlow b64 and checks its latency
    line; returns the slim model path."""
    out_path = str(tmp_path / "slim.keras")
    code, out, err = run(
        ["prune", model_path, *argv, "--latency", "0.9", *FAST,
         "--out", out_path], capsys,
    )
    assert code == 0, err
    line = next(x for x in out.splitlines() if x.startswith("latency ("))
    full, slim = map(float, re.findall(r"([\d.]+) ms", line))
    assert full > 0 and slim > 0 and "target 90.0%" in line
    if "--method" in argv and argv[argv.index("--method") + 1] != "adaptive":
        # `plan_for_latency`'s plans: each verified plan's ratio, the
        # written model's among them (adaptive times its own gates).
        ratio = re.search(r"\(([\d.]+%); target", line).group(1)
        assert ratio in line.split("plans timed: ")[1].split(", ")
    return out_path


def test_prune_to_a_latency_target(model_path, tmp_path, capsys):
    out_path = prune_to_90_percent(model_path, tmp_path, capsys,
                                   "--method", "magnitude")
    model = keras.saving.load_model(model_path)
    plan = kc.PruningPlan.from_json((tmp_path / "slim.plan.json").read_text())
    small = keras.saving.load_model(out_path)
    x = np.random.default_rng(0).uniform(size=(4, 8, 8, 1))
    np.testing.assert_allclose(
        small.predict(x, verbose=0), kc.slim(model, plan).predict(x, verbose=0),
        atol=1e-5,
    )
    assert json.loads(plan.to_json()).get("remove_blocks", []) == list(
        plan.remove_blocks
    )


def test_prune_says_when_its_latency_table_failed_its_checks(
        model_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(latency.quality, "problems",
                        lambda *a, **k: ["the fit's RMS residual is 1 ms"])
    monkeypatch.setenv("KERAS_CSGD_CACHE", str(tmp_path / "cache"))
    code, out, err = run(
        ["prune", model_path, "--method", "magnitude", "--latency", "0.9",
         *FAST, "--out", str(tmp_path / "slim.keras")], capsys)
    assert code == 0, err
    (line,) = [x for x in out.splitlines()
               if x.startswith("warning: The latency table")]
    assert "failed its checks in 2 measurements" in line
    assert "the fit's RMS residual is 1 ms" in line


@pytest.mark.parametrize("method", ["asfp", "cap", "adaptive", "ensembles"])
def test_trained_and_compensated_methods_take_a_latency_target(
        model_path, tmp_path, capsys, method):
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.uniform(size=(32, 8, 8, 1)).astype("float32"),
             y=rng.integers(0, 10, 32))
    out_path = prune_to_90_percent(
        model_path, tmp_path, capsys, "--method", method, "--data",
        str(data), "--epochs", "1",
    )
    small = keras.saving.load_model(out_path)
    plan = kc.PruningPlan.from_json((tmp_path / "slim.plan.json").read_text())
    model = keras.saving.load_model(model_path)
    assert kc.count_macs(small) == kc.macs_under(model, plan)


@pytest.fixture(scope="module")
def given_plan(model_path, tmp_path_factory):
    """A plan JSON that narrows every group and removes the first block."""
    model = keras.saving.load_model(model_path)
    plan = kc.make_plan(model, keep=0.5)
    block = next(layer.name for layer in model.layers
                 if isinstance(layer, keras.layers.Add))
    plan = kc.PruningPlan(plan.clusters, remove_blocks=[block])
    path = tmp_path_factory.mktemp("given") / "given.plan.json"
    path.write_text(plan.to_json())
    return str(path), plan


@pytest.mark.parametrize("method", ["cap", "csgd", "asfp", "ensembles"])
def test_methods_carry_out_a_given_plan(model_path, given_plan, tmp_path,
                                        capsys, method):
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.uniform(size=(32, 8, 8, 1)).astype("float32"),
             y=rng.integers(0, 10, 32))
    out_path = str(tmp_path / "slim.keras")
    code, out, err = run(
        ["prune", model_path, "--method", method, "--plan", given_plan[0],
         "--data", str(data), "--epochs", "1", "--ensemble-images", "16",
         "--out", out_path], capsys)
    assert code == 0, err
    written = kc.PruningPlan.from_json(
        (tmp_path / "slim.plan.json").read_text())
    given = given_plan[1]
    assert written.widths() == given.widths()
    assert written.remove_blocks == given.remove_blocks
    model = keras.saving.load_model(model_path)
    small = keras.saving.load_model(out_path)
    assert kc.count_macs(small) == kc.macs_under(model, written)
    if method == "csgd":  # k-means clusters at the given widths
        assert any(len(c) > 1 for cl in written.clusters.values()
                   for c in cl)


@pytest.mark.parametrize("argv, message", [
    (["--method", "magnitude", "--latency", "1.5"], "fraction in (0, 1)"),
    (["--method", "gsm", "--latency", "0.5"], "--latency works with"),
    (["--method", "magnitude", "--latency", "0.5", "--keep", "0.5"],
     "give one of --keep, --latency, --plan; got --keep and --latency"),
    (["--method", "adaptive", "--plan", "p.json"], "--plan works with"),
    (["--method", "cap", "--plan", "missing.json"], "not an existing file"),
    (["--method", "magnitude", "--latency", "0.5", "--runtime", "onnx"],
     "invalid choice"),
])
def test_bad_latency_input_exits_2(model_path, tmp_path, capsys, argv,
                                   message):
    out_path = tmp_path / "slim.keras"
    code, _, err = run(["prune", model_path, *argv, "--out", str(out_path)],
                       capsys)
    assert code == 2
    assert err.startswith("keras-csgd: error:") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not out_path.exists()


def test_profile_help(capsys):
    code, out, _ = run(["profile", "--help"], capsys)
    assert code == 0 and out.startswith("usage: keras-csgd profile")
    code, out, _ = run(["prune", "--help"], capsys)
    assert code == 0 and "--latency" in out and "--batch-size" in out


@pytest.mark.parametrize("timings, missed", [
    (tuple(0.99 - 0.01 * k for k in range(adaptive.TRIES)), True),
    ((0.99, 0.88), False),
])
def test_adaptive_tightens_its_gates_until_the_latency_is_met(
        model_path, tmp_path, capsys, monkeypatch, timings, missed):
    """adaptive's gates lock by the table's prediction; the command times
    the slim model, tightens the gates while it measures above the target
    (up to `adaptive.TRIES` timings), and says when it still missed."""
    queue, macs = list(timings), []

    def timed(model, slim, *args, **kwargs):
        macs.append(kc.count_macs(slim))
        ratio = queue.pop(0)
        return 1.0, ratio, ratio

    monkeypatch.setattr(kc.latency, "time_against_full", timed)
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.uniform(size=(32, 8, 8, 1)).astype("float32"),
             y=rng.integers(0, 10, 32))
    code, out, err = run(
        ["prune", model_path, "--method", "adaptive", "--data", str(data),
         "--epochs", "0", "--latency", "0.9", *FAST, "--out",
         str(tmp_path / "slim.keras")], capsys)
    assert code == 0, err
    assert not queue and macs == sorted(macs, reverse=True)
    assert macs[-1] < macs[0]
    lines = [x for x in out.splitlines() if x.startswith("adaptive: the ")]
    assert [x.split("measures ")[1] for x in lines] == [
        f"{t:.1%}" for t in timings]
    small = keras.saving.load_model(tmp_path / "slim.keras")
    assert kc.count_macs(small) == macs[-1]
    last = timings[-1]
    assert f"({last:.1%}; target 90.0%)" in out
    assert (f"latency target missed: measured {last:.1%} of the full "
            "latency" in out) is missed
