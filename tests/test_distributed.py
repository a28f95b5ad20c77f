"""`MultiWorkerMirroredStrategy`: two worker processes on 127.0.0.1.

Both workers run tests/_multiworker_job.py (C-SGD, GSM, then SGD with the
ASFP callback, a few steps each on the same global batches, in a custom
loop: Keras 3 `model.fit` does not run under this strategy) and must finish
within `TIMEOUT` seconds holding equal weights (BatchNormalization with
`synchronized=True`; otherwise its moving statistics are per worker).
Single-process `MirroredStrategy` against one device is tested in
test_centripetal_sgd.py, test_global_sparse_momentum.py and test_asfp.py.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import keras_csgd as kc

JOB = os.path.join(os.path.dirname(__file__), "_multiworker_job.py")
TIMEOUT = 120  # seconds for both workers together
WORKERS = 2
NAMES = ("csgd", "gsm", "asfp")


def free_ports(n):
    """`n` distinct free TCP ports on the loopback interface."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_workers(out):
    """Starts every worker, waits at most `TIMEOUT` s, kills on timeout."""
    cluster = [f"127.0.0.1:{p}" for p in free_ports(WORKERS)]
    procs = []
    for index in range(WORKERS):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps({
            "cluster": {"worker": cluster},
            "task": {"type": "worker", "index": index},
        })
        procs.append(subprocess.Popen(
            [sys.executable, JOB, str(out)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))
    deadline = time.monotonic() + TIMEOUT
    logs = []
    try:
        for p in procs:
            left = max(1.0, deadline - time.monotonic())
            logs.append(p.communicate(timeout=left)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"the workers did not finish within {TIMEOUT} s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("multiworker")
    run_workers(out)
    return {
        name: [dict(np.load(out / f"{name}_worker{i}.npz"))
               for i in range(WORKERS)]
        for name in NAMES
    }


def weights(arrays, kind):
    n = sum(k.startswith(f"{kind}_") for k in arrays)
    return [arrays[f"{kind}_{i}"] for i in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_workers_finish_with_equal_weights(results, name):
    first, *others = results[name]
    final = weights(first, "final")
    assert final and all(np.isfinite(w).all() for w in final)
    moved = [not np.array_equal(a, b)
             for a, b in zip(weights(first, "initial"), final)]
    assert any(moved)
    assert int(first["iterations"]) == (12 if name == "asfp" else 6)
    for other in others:
        for a, b in zip(weights(other, "final"), final):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
        assert int(other["iterations"]) == int(first["iterations"])


@pytest.mark.slow
def test_csgd_pulls_clusters_together_across_workers(results):
    before, after = results["csgd"][0]["spread"]
    assert after < 0.5 * before


@pytest.mark.slow
def test_asfp_zeroes_the_same_filters_on_every_worker(results):
    plans = [kc.PruningPlan.from_json(str(r["plan"])) for r in results["asfp"]]
    assert plans[0].widths() == {"c1": 3, "c2": 3}
    assert all(p == plans[0] for p in plans[1:])
