"""How each runtime is timed: in process or a worker process per model,
the session settings, and the quick files profiling writes.

The protocol tests use a fake worker whose block medians are a model's
MACs (`macs_ms`): call counts and results are deterministic. No test
asserts a wall-clock speed.
"""

import importlib
import os

import keras
import numpy as np
import onnx
import openvino as ov
import pytest
from test_latency import macs_ms, tiny

import keras_csgd as kc
from keras_csgd import graph, latency, runtimes
from keras_csgd.latency import design, sweep, timing, worker, writers
from keras_csgd.runtimes import onnx as onnx_runtime
from keras_csgd.runtimes import openvino as openvino_runtime

# `keras_csgd.latency.profile` is also the name of the function.
profiling = importlib.import_module("keras_csgd.latency.profile")


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return tiny(8)


def test_only_onnxruntime_and_openvino_time_in_processes_of_their_own():
    separate = {name for name, rt in runtimes.RUNTIMES.items()
                if rt.separate_process}
    assert separate == {"onnxruntime", "openvino"}
    # The protocol is in the latency cache key.
    assert runtimes.get("onnxruntime").versions()["separate_process"]
    assert runtimes.get("openvino").versions()["separate_process"]
    assert "separate_process" not in runtimes.get("litert").versions()


class FakeWorker:
    """Stands in for `worker.Worker`: "loads" the MACs `quick_write` (faked
    below) wrote, and times a block as `macs_ms` of them."""

    made = []

    def __init__(self, runtime, batch_size, threads):
        self.args = (runtime, batch_size, threads)
        self.loads, self.blocks, self.closed = [], [], False
        FakeWorker.made.append(self)

    def load(self, path):
        with open(path) as f:
            self.ms = 1.0 + float(f.read()) / 1e5
        self.loads.append(os.path.basename(path))

    def block(self, calls, warmup):
        self.blocks.append((calls, warmup))
        return self.ms

    def close(self):
        self.closed = True


def fake_quick_write(self, model, path):
    """Writes `model`'s MACs (what `FakeWorker` times) to `path`."""
    with open(path, "w") as f:
        f.write(str(kc.count_macs(model)))


@pytest.fixture
def fake_workers(monkeypatch):
    monkeypatch.setattr(timing, "Worker", FakeWorker)
    monkeypatch.setattr(FakeWorker, "made", [])
    written = []

    def quick_write(self, model, path):
        written.append(model.name)
        fake_quick_write(self, model, path)

    for cls in (runtimes.OnnxRuntime, runtimes.OpenVINO):
        monkeypatch.setattr(cls, "quick_write", quick_write)
    # No writer processes: the fake `quick_write` is this process's.
    monkeypatch.setattr(writers, "_save", lambda model, folder: None)
    return written


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_separate_process_runtime_times_each_model_in_its_worker(
    model, runtime, tmp_path, monkeypatch
):
    monkeypatch.setattr(timing, "Worker", FakeWorker)
    monkeypatch.setattr(FakeWorker, "made", [])
    variant = tiny(4, name="narrow")
    paths = {}
    for m in (model, variant):
        paths[m.name] = str(tmp_path / f"{m.name}.x")
        fake_quick_write(None, m, paths[m.name])
    with timing.Pair(model, runtime, 1, 2, False, block_ms=5.0,
                     budget_ms=100.0, rounds=(3, 3),
                     path=paths["tiny"]) as pair:
        stats = pair.against(None, paths["narrow"])
        full, other = FakeWorker.made
        assert full.args == other.args == (runtime, 1, 2)
        with pytest.raises(ValueError, match="`path` is required"):
            pair.against(variant)
    assert full.closed and other.closed
    assert full.loads == ["tiny.x"] and other.loads == ["narrow.x"]
    # Sizing (3 calls after 2), one call each, then 3 rounds of blocks of
    # round(5 ms / full ms) calls after one untimed call.
    calls = round(5.0 / macs_ms(model))
    assert full.blocks == [(3, 2), (1, 0)] + [(calls, 1)] * 3
    assert other.blocks == [(1, 0)] + [(calls, 1)] * 3
    assert stats["ratio"] == pytest.approx(macs_ms(variant) / macs_ms(model))


def test_an_in_process_runtime_starts_no_worker(model, fake_workers,
                                                monkeypatch):
    monkeypatch.setattr(timing, "runner",
                        lambda m, *args, path=None: lambda: None)
    with timing.Pair(model, "litert", 1, 1, False, 5.0, 10.0,
                     (2, 2)) as pair:
        pair.against(tiny(4, name="narrow"))
    assert FakeWorker.made == [] and fake_workers == []


def test_a_pair_compares_blocks_by_the_runtimes_statistic(model,
                                                          monkeypatch):
    """TensorFlow compares its calls' median blocks (its calls vary by
    themselves), the other runtimes their fastest; the TensorFlow cache
    key says so (tables timed before it compared the fastest)."""
    first, second = np.array([1.0, 2.0, 2.2]), np.array([1.5, 2.0, 2.4])
    fastest = timing.block_ratio(first, second, "fastest")
    assert fastest == timing.fastest_blocks(first, second)
    assert fastest["ratio"] == pytest.approx(1.5)
    median = timing.block_ratio(first, second, "median")
    assert median["first_ms"] == 2.0 and median["ratio"] == 1.0
    assert runtimes.get("tensorflow").block_statistic == "median"
    assert {runtimes.get(n).block_statistic for n in
            ("litert", "litert-int8", "onnxruntime", "openvino")} == {
                "fastest"}
    # A pair reduces the same blocks by its runtime's statistic.
    monkeypatch.setattr(timing, "runner", lambda m, *args, path=None: m)
    monkeypatch.setattr(timing, "schedule", lambda *args: (1, 3))
    monkeypatch.setattr(timing, "interleaved",
                        lambda full, variant, rounds, calls: (first, second))
    for name, ratio in (("tensorflow", 1.0), ("litert", 1.5)):
        pair = timing.Pair(model, name, 1, 1, False, 5.0, 10.0, (3, 3))
        assert pair.against(model)["ratio"] == pytest.approx(ratio)
    fields = {rt: profiling.key_fields(model, rt, 1, 2, False, (0.5,))
              for rt in ("litert", "tensorflow")}
    assert fields["tensorflow"]["block_statistic"] == "median"
    assert "block_statistic" not in fields["litert"]


def test_tensorflow_verifies_in_blocks_of_at_least_50_ms(model,
                                                       monkeypatch):
    """TensorFlow's first call after another model's runs slower than the
    next ones, so verification times it in blocks of at least
    `verify_block_ms` (50 ms) after an untimed call; the other runtimes in
    blocks of about 10 ms. Profiles keep their short blocks."""
    blocks = []

    def block_timer(call):
        def block(calls, warmup):
            blocks.append((calls, warmup))
            return 2.0  # ms per call
        return block

    monkeypatch.setattr(timing, "runner", lambda m, *args, path=None: m.name)
    monkeypatch.setattr(timing, "block_timer", block_timer)
    variant = tiny(4, name="narrow")
    for name, calls in (("tensorflow", 25), ("litert", 5)):
        blocks.clear()
        full_ms, slim_ms, ratio = latency.time_against_full(
            model, variant, name, threads=1)
        assert (full_ms, slim_ms, ratio) == (2.0, 2.0, 1.0)
        # Sizing, one call each, then rounds of a block of each model: as
        # many as fit 6 s, at most 101.
        rounds = min(101, round(6000.0 / (2 * calls * 2.0)))
        assert blocks == [(3, 2), (1, 0), (1, 0)] + [
            (calls, 1)] * (2 * rounds)
    assert runtimes.get("tensorflow").verify_block_ms == 50.0
    assert {runtimes.get(n).verify_block_ms for n in
            ("litert", "litert-int8", "onnxruntime", "openvino")} == {0.0}
    # A profile's pair: blocks of about 5 ms on every runtime.
    blocks.clear()
    monkeypatch.setattr(timing, "interleaved", lambda *args: (
        np.ones(3), np.ones(3)))
    timer = sweep.Timer(model, "tensorflow", 1, 1, False, None, None,
                        writers.Files("tensorflow", None))
    assert timer.pair.calls == round(5.0 / 2.0)


def test_profile_writes_each_variant_once_for_all_attempts(
    model, fake_workers, tmp_path, monkeypatch
):
    """The first attempt fails its checks (faked): the second re-times the
    files the first wrote, in two new workers (its fit and the fit of the
    two measurements' mean are checked)."""
    verdicts = [["faked problem"], [], []]
    monkeypatch.setattr(profiling.quality, "problems",
                        lambda *args: verdicts.pop(0))
    table = latency.profile(model, "onnxruntime", threads=1, rounds=2,
                            cache_dir=tmp_path, verbose=0)
    assert table.fields["checks"] == {"clean": True, "attempts": 2,
                                      "problems": []}
    assert table.fields["fit_rms_ms"] < 1e-6
    assert len(FakeWorker.made) == 4  # two per attempt
    assert all(w.closed for w in FakeWorker.made)
    first, second = FakeWorker.made[1].loads, FakeWorker.made[3].loads
    assert first == second == [f"variant{k}.onnx"
                               for k in range(len(first))]
    assert FakeWorker.made[0].loads == FakeWorker.made[2].loads == [
        "full.onnx"]
    assert fake_workers[0] == model.name
    assert len(fake_workers) == 1 + len(first) > 2  # each written once
    # Every variant's block medians are its MACs' `macs_ms`: the table
    # predicts the full model exactly.
    assert table.full == pytest.approx(macs_ms(model))


def test_profile_compiles_each_tensorflow_variant_once_for_all_attempts(
    model, tmp_path, monkeypatch
):
    """TensorFlow has no files: a second attempt (the first fails its
    checks, faked) times the variants the first compiled."""
    verdicts = [["faked problem"], [], []]
    monkeypatch.setattr(profiling.quality, "problems",
                        lambda *args: verdicts.pop(0))
    compiled = []

    class Call:
        def __init__(self, m):
            self.ms = macs_ms(m)

    def runner(m, *args, path=None):
        compiled.append(m)
        return Call(m)

    built, variant = [], design.variant

    def counted(*args):
        built.append(args)
        return variant(*args)

    monkeypatch.setattr(timing, "runner", runner)
    monkeypatch.setattr(design, "variant", counted)
    monkeypatch.setattr(timing, "block_timer",
                        lambda call: lambda calls, warmup: call.ms)
    table = latency.profile(model, "tensorflow", rounds=2,
                            cache_dir=tmp_path, verbose=0)
    assert table.fields["checks"]["attempts"] == 2
    an = graph.analyze(model)
    work = profiling._Design(model, an, design.prunable_groups(model, an),
                             design.GRID, 8).work
    assert len(built) == len(work) > 2  # each variant built once
    assert len(compiled) == 2 + len(work)  # and the full model per attempt
    assert table.full == pytest.approx(macs_ms(model))


def test_onnxruntime_sessions_stop_spinning_after_a_call():
    options = onnx_runtime.session_options(2)
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.execution_mode.name == "ORT_SEQUENTIAL"
    assert options.graph_optimization_level.name == "ORT_ENABLE_ALL"
    assert options.get_session_config_entry(
        "session.force_spinning_stop") == "1"
    for pool in ("intra_op", "inter_op"):  # ONNX Runtime's default: spin
        with pytest.raises(Exception, match="does not have configuration"):
            options.get_session_config_entry(
                f"session.{pool}.allow_spinning")
    assert onnx_runtime.session_options(None).intra_op_num_threads == 0


def test_openvino_compiles_with_explicit_cpu_properties(model, tmp_path,
                                                        monkeypatch):
    path = str(tmp_path / "m.xml")
    kc.export(model, path, "openvino")
    asked = []
    real = ov.Core.compile_model

    def compile_model(core, file, device, config):
        asked.append(config)
        compiled = real(core, file, device, config)
        asked.append({k: compiled.get_property(k) for k in config})
        return compiled

    monkeypatch.setattr(ov.Core, "compile_model", compile_model)
    runtimes.get("openvino").load(path, threads=1)
    config, actual = asked
    assert config == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
                      "ENABLE_CPU_PINNING": False,
                      "ENABLE_CPU_RESERVATION": False,
                      "INFERENCE_NUM_THREADS": 1}
    assert str(actual.pop("PERFORMANCE_HINT")).endswith("LATENCY")
    assert actual == {k: v for k, v in config.items()
                      if k != "PERFORMANCE_HINT"}
    assert "INFERENCE_NUM_THREADS" not in openvino_runtime.cpu_config(None)


def _onnx_ops(path):
    return [node.op_type for node in onnx.load(path).graph.node]


def _openvino_ops(path):
    return [op.get_type_name()
            for op in ov.Core().read_model(path).get_ordered_ops()]


@pytest.mark.parametrize("fmt, ops", [("onnx", _onnx_ops),
                                      ("openvino", _openvino_ops)])
def test_quick_write_writes_the_graph_keras_exports(model, fmt, ops,
                                                    tmp_path):
    runtime = runtimes.for_format(fmt)
    quick = str(tmp_path / f"quick{runtime.suffix}")
    exported = str(tmp_path / f"keras{runtime.suffix}")
    runtime.quick_write(model, quick)
    runtime.write(model, exported)
    assert ops(quick) == ops(exported)
    x = np.random.default_rng(1).uniform(size=(3, 8, 8, 3)).astype("f4")
    assert np.array_equal(runtime.load(quick, 1).run(x),
                          runtime.load(exported, 1).run(x))


def test_a_worker_times_a_file_and_reports_failures(model, tmp_path):
    path = str(tmp_path / "m.onnx")
    kc.export(model, path, "onnx")
    with worker.Worker("onnxruntime", 2, 1) as child:
        with pytest.raises(RuntimeError, match="worker of onnxruntime "
                                               "failed: TypeError"):
            child.block(2, 0)  # nothing loaded yet
        with pytest.raises(RuntimeError, match="NoSuchFile"):
            child.load(str(tmp_path / "missing.onnx"))
        child.load(path)
        assert child.block(3, 1) > 0
    assert child.process.returncode == 0


def test_a_writer_process_writes_the_variant_built_here(model, tmp_path):
    an = graph.analyze(model)
    expected = writers.signature(model, an)
    source = str(tmp_path / "source.keras")
    model.save(source)
    path = str(tmp_path / "v.tflite")
    widths, removed = {"b_conv1": 4}, ["b_add"]
    with writers.Writer(source, "litert", expected, []) as child:
        child.start()
        child.write((path, widths, removed))
    here = design.variant(model, an, widths, removed)
    x = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype("f4")
    out = runtimes.get("litert").load(path, 1).run(x)
    np.testing.assert_allclose(out, here.predict(x, verbose=0), atol=1e-5)
    with writers.Writer(source, "litert", [expected[0], []], []) as child:
        with pytest.raises(RuntimeError, match="loaded model differs"):
            child.start()


class FakeWriter:
    """Stands in for `writers.Writer` in this process: writes the job's
    widths, and fails on the file named "bad"."""

    made = []

    def __init__(self, source, runtime, expected, modules):
        self.jobs = []
        FakeWriter.made.append(self)

    def start(self):
        pass

    def write(self, job):
        if job[0].endswith("bad"):
            raise RuntimeError("faked failure")
        with open(job[0], "w") as f:
            f.write(f"child {job[1]}")
        self.jobs.append(job[0])

    def close(self):
        pass


@pytest.mark.parametrize("serializable", [True, False])
def test_write_all_shares_the_files_and_writes_failures_here(
    model, tmp_path, monkeypatch, serializable
):
    monkeypatch.setattr(writers, "Writer", FakeWriter)
    monkeypatch.setattr(FakeWriter, "made", [])
    if not serializable:
        monkeypatch.setattr(writers, "_save", lambda model, folder: None)
    runtime = runtimes.get("litert")
    here = []

    def quick_write(m, path):
        here.append(os.path.basename(path))
        with open(path, "w") as f:
            f.write(f"here {m}")

    monkeypatch.setattr(runtime, "quick_write", quick_write)
    names = [f"v{k}" for k in range(12)] + ["bad"]
    jobs = [(str(tmp_path / n), {"b_conv1": 1 + k % 7}, ())
            for k, n in enumerate(names)]
    (tmp_path / "v0").write_text("already written")
    writers.write_all(model, graph.analyze(model), runtime, jobs,
                      str(tmp_path), processes=3, verbose=0)
    children = [name for w in FakeWriter.made for name in w.jobs]
    assert len(FakeWriter.made) == (2 if serializable else 0)
    assert (tmp_path / "v0").read_text() == "already written"
    # Every other file written once, the failed one here.
    assert sorted(here + [os.path.basename(p) for p in children]) == sorted(
        names[1:])
    assert "bad" in here
    assert (tmp_path / "bad").read_text().startswith("here")
