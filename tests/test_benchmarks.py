"""The CIFAR-10 benchmark harness on a synthetic image folder (no ../shared).

`benchmarks/cifar10.py --profile smoke` on 40 generated 32x32 images: the
result JSON, the base-model cache, MACs against an independently built
narrow ResNet-20; `benchmarks/make_tables.py` verdicts on hand-made results;
the interleaved timing loop of `benchmarks/latency.py`.
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

import keras_csgd as kc
from keras_csgd.models import resnet_cifar

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)  # latency.py imports cifar10
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", os.path.join(BENCH, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


cifar10 = _load("cifar10")
make_tables = _load("make_tables")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """40 PNG images, 4 classes of 10, each class a noisy base colour."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(4):
        os.makedirs(root / f"class{c}")
        colour = rng.integers(0, 256, 3)
        for i in range(10):
            noise = rng.integers(-30, 31, (32, 32, 3))
            image = np.clip(colour + noise, 0, 255).astype(np.uint8)
            tf.io.write_file(
                str(root / f"class{c}" / f"{i:02d}.png"),
                tf.io.encode_png(image),
            )
    return root


def _run(folder, tmp, method):
    return cifar10.main([
        "--method", method, "--profile", "smoke", "--data-dir", str(folder),
        "--cache-dir", str(tmp / "cache"),
        "--results-dir", str(tmp / "results"),
    ])


def test_smoke_runs_write_results_and_reuse_the_base(folder, tmp_path):
    csgd = _run(folder, tmp_path, "csgd")
    path = tmp_path / "results" / "resnet20_csgd_smoke_s0.json"
    assert json.loads(path.read_text()) == json.loads(json.dumps(csgd))
    assert csgd["data"] == {
        "train_images": 32, "val_images": 8, "test_images": None,
        "validation": "last 8 of a fixed shuffle (seed 0) of the training "
        "folder",
    }
    narrow = kc.count_macs(resnet_cifar(20, widths=(10, 20, 40)))
    full = kc.count_macs(resnet_cifar(20))
    assert csgd["macs"]["base"] == full
    assert csgd["macs"]["final"] == narrow
    np.testing.assert_allclose(csgd["macs"]["ratio"], narrow / full)
    assert 0.55 <= csgd["macs"]["reduction"] <= 0.65
    for key in ("base", "trained", "slim", "final"):
        # an accuracy over the 8 validation images: a multiple of 1/8
        assert (csgd["accuracy"][key] * 8) % 1 == 0
    assert csgd["accuracy"]["final"] == csgd["accuracy"]["slim"]
    assert csgd["wall_seconds"]["base_cached"] is False
    assert csgd["command"].startswith("python benchmarks/cifar10.py ")
    assert "--method csgd" in csgd["command"]
    assert csgd["machine"]["cores"] == len(os.sched_getaffinity(0))

    cap = _run(folder, tmp_path, "cap")
    assert cap["wall_seconds"]["base_cached"] is True
    assert cap["accuracy"]["base"] == csgd["accuracy"]["base"]
    assert cap["macs"]["final"] == narrow
    assert cap["epochs"]["method"] == 0

    found = make_tables.main([
        "--results-dir", str(tmp_path / "results"), "--profiles", "smoke"
    ])["resnet20/smoke"]
    assert isinstance(found["1"]["verdict"], bool)
    assert isinstance(found["4"]["verdict"], bool)
    for key in ("2", "3", "5"):
        assert found[key]["verdict"] == "not run"
    text = (tmp_path / "results" / "RESULTS.md").read_text()
    assert "| csgd | 1 |" in text and "| cap | 1 |" in text
    assert "--method cap" in text
    assert (tmp_path / "results" / "accuracy_vs_macs.png").stat().st_size


@pytest.mark.slow
@pytest.mark.parametrize("method", [
    "scratch", "magnitude", "asfp", "sfp", "ensembles", "gsm", "similarity",
    "functionality", "adaptive",
])
def test_every_method_runs_in_smoke(folder, tmp_path_factory, method):
    tmp = tmp_path_factory.getbasetemp() / "all_methods"
    result = _run(folder, tmp, method)
    if method == "gsm":
        assert result["macs"]["ratio"] == 1.0
        np.testing.assert_allclose(result["details"]["density"], 0.1, 1e-3)
    else:
        assert 0.55 <= result["macs"]["reduction"] <= 0.65
    assert (result["accuracy"]["final"] * 8) % 1 == 0  # 8 val images


# ------------------------------------------------------- make_tables
def _fake(method, seed, final, **extra):
    accuracy = {"base": 0.9, "trained": None, "slim": final,
                "finetuned": None, "final": final}
    accuracy.update(extra.pop("accuracy", {}))
    return {
        "model": "resnet20", "method": method, "profile": "quick",
        "seed": seed, "keep": 0.625, "accuracy": accuracy,
        "headline": "slim", "test_accuracy": None,
        "macs": {"base": 100, "final": 39, "ratio": 0.39, "reduction": 0.61},
        "params": {"base": 10, "final": 4},
        "epochs": {"base": 15, "method": extra.pop("epochs", 6)},
        "wall_seconds": {"method": 60, "base_training": 600,
                         "base_cached": True},
        "data": {"val_images": 5000, "validation": "last 5000"},
        "details": extra.pop("details", {}),
        "command": f"python benchmarks/cifar10.py --method {method} "
        f"--seed {seed}",
    }


def test_claims_from_results():
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.004)):
        runs += [
            _fake("magnitude", seed, 0.85 + shift),
            _fake("csgd", seed, 0.88 + shift,
                  accuracy={"trained": 0.88 + shift}),
            _fake("scratch", seed, 0.86 + shift,
                  details={"total_epochs_from_random": 21}),
            _fake("asfp", seed, 0.80 + shift),
            _fake("sfp", seed, 0.82 + shift),
            _fake("cap", seed, 0.50, epochs=0,
                  details={"plain_removal_accuracy": 0.30}),
            _fake("gsm", seed, 0.893 - shift, details={"density": 0.1}),
        ]
    grouped = make_tables.group_runs(runs)
    found = make_tables.claims(grouped["resnet20", "quick"])
    assert found["1"]["verdict"] is True
    assert found["2"]["verdict"] is True
    np.testing.assert_allclose(found["2"]["difference_points"], 2.0)
    assert found["3"]["verdict"] is False
    assert found["3"]["equal_macs"] is True
    assert found["4"]["verdict"] is True
    # GSM loses 0.7 and 1.1 points: mean 0.9 > 0.5.
    assert found["5"]["verdict"] is False
    np.testing.assert_allclose(found["5"]["loss_points"], 0.9)
    np.testing.assert_allclose(
        found["5"]["loss_sd_points"], 100 * np.std([0.007, 0.011], ddof=1),
        atol=1e-3,  # the JSON keeps 3 decimals of a point
    )
    per = found["6"]["per_method"]
    assert found["6"]["verdict"] is False
    assert per["csgd"]["verdict"] is True and per["asfp"]["verdict"] is False
    assert per["gsm"]["verdict"] == "n/a" and "scratch" not in per
    assert "epochs" in per["cap"]["note"]

    only_magnitude = make_tables.claims({"magnitude": [runs[0]]})
    for key in ("1", "2", "3", "4", "5", "6"):
        assert only_magnitude[key]["verdict"] == "not run"

    text = make_tables.markdown(grouped, {"resnet20/quick": found})
    row = next(ln for ln in text.splitlines() if ln.startswith("| csgd |"))
    assert "**88.20 ± 0.28**" in row  # mean, sample sd over the two seeds
    assert "--seed 0" in row and "--seed 1" in row


def test_small_difference_from_one_seed_is_flagged():
    grouped = make_tables.group_runs([
        _fake("magnitude", 0, 0.850), _fake("similarity", 0, 0.853)
    ])
    found = make_tables.claims(grouped["resnet20", "quick"])
    sub = found["6"]["per_method"]["similarity"]
    assert sub["verdict"] is True
    assert "single seed" in sub["note"]


def test_update_readme_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(
        f"intro\n{make_tables.START}\nold\n{make_tables.END}\noutro\n"
    )
    assert make_tables.update_readme(readme, "new table\n")
    assert readme.read_text() == (
        f"intro\n{make_tables.START}\nnew table\n{make_tables.END}\noutro\n"
    )
    plain = tmp_path / "other.md"
    plain.write_text("no markers\n")
    assert not make_tables.update_readme(plain, "x")
    assert plain.read_text() == "no markers\n"


# ----------------------------------------------------------- latency
def test_interleaved_times_every_call_in_every_round():
    latency = _load("latency")
    counts = {}

    def counter(key):
        def call():
            counts[key] = counts.get(key, 0) + 1
        return call

    keys = [("full", "keras", 1), ("slim", "keras", 1), ("slim", "tflite", 64)]
    blocks = latency.interleaved(
        {key: counter(key) for key in keys}, rounds=3, runs={1: 4, 64: 2}
    )
    assert {k: len(v) for k, v in blocks.items()} == dict.fromkeys(keys, 3)
    assert blocks[keys[2]][0]["runs"] == 2
    # one untimed warm-up call, then per round one warm-up + `runs` calls
    assert counts == {keys[0]: 16, keys[1]: 16, keys[2]: 10}


def test_recovery_variants_fine_tune_and_add_to_their_file(folder, tmp_path):
    recovery = _load("recovery")
    argv = ["--data-dir", str(folder), "--train-size", "32",
            "--base-epochs", "1", "--epochs", "1", "--cache-dir",
            str(tmp_path / "cache"), "--out", str(tmp_path / "r.json")]
    recovery.main([*argv, "--variants", "+ cosine lr"])
    result = recovery.main([*argv, "--variants", "+ distillation"])
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert list(result["variants"]) == ["+ cosine lr", "+ distillation"]
    assert len(result["commands"]) == 2 and result["machine"]["cores"]
    cosine, distilled = result["variants"].values()
    assert not cosine["distilled"] and distilled["distilled"]
    assert distilled["augmented"] and not cosine["augmented"]
    assert distilled["teacher_accuracy"] == result["base"]["val_accuracy"]
    assert cosine["accuracy_before"] == distilled["accuracy_before"]
    assert cosine["validation_samples"] == result["data"]["val_images"] == 8


def test_hub_coverage_rows_and_target():
    pytest.importorskip("keras_hub")
    coverage = _load("hub_coverage")
    row = coverage.cover("VGG")
    assert row["exact"] and row["count_vs_reference"] == 1.0
    assert row["keep_0.5_macs_ratio"] <= 0.65 and row["meets_target"]
    for key, value in [("keep_0.5_macs_ratio", 0.7), ("exact", False),
                       ("count_vs_reference", 0.9)]:
        assert not coverage.meets_target({**row, key: value})
    table = coverage.markdown([row, {**row, "family": "X", "exact": False}])
    assert table.startswith("1 of 2 families meet the target")
    assert "| X |" in table and "| NO |" in table


def test_lm_width_fixed_axes_keep_their_fraction_and_hit_the_budget():
    pytest.importorskip("keras_hub")
    lm_width = _load("lm_width")
    model = lm_width.decoder_lm(lm_width.PROFILES["quick"])
    rng = np.random.default_rng(0)
    scores = {g.name: rng.random(g.size)
              for g in kc.channel_groups(model) if g.prunable}
    plan, slim, keep = lm_width.plan_for_params(
        model, scores, 0.5, {"other": 0.75, "heads": 1.0})
    widths = plan.widths()
    assert widths["embedding"] == 72  # 0.75 of 96
    assert widths["b0_attention/heads"] == widths["b1_attention/heads"] == 4
    assert widths["b0_mlp_up"] == kc.clusters.target_width(384, keep)
    assert abs(slim.count_params() / model.count_params() - 0.5) <= 0.02
    one = lm_width.plan_with_keeps(model, scores, dict.fromkeys(scores, 0.6))
    assert one.clusters == kc.plan_from_scores(model, scores, 0.6).clusters


def test_lm_width_caches_the_teacher(tmp_path, monkeypatch):
    pytest.importorskip("keras_hub")
    lm_width = _load("lm_width")
    monkeypatch.setattr(lm_width, "CACHE", str(tmp_path))
    profile = lm_width.PROFILES["smoke"]
    train, held = lm_width.byte_corpus(
        lm_width.text_files(), train_bytes=4_000, eval_bytes=2_000)
    data = lm_width.windows(train, profile.seq_len)
    held_out = lm_width.windows(held, profile.seq_len)
    args = argparse.Namespace(seed=0, text_dir=None)
    trained, first = lm_width.teacher_model(profile, data, held_out, args)
    loaded, again = lm_width.teacher_model(profile, data, held_out, args)
    assert not first["cached"] and again["cached"]
    assert {**first, "cached": True} == again
    assert lm_width.perplexity(loaded, *held_out) == pytest.approx(
        first["perplexity"], rel=1e-5)
