"""Times `channel_groups` + `make_plan` + `slim` on keras.applications models.

    .venv/bin/python benchmarks/surgery.py

Writes benchmarks/results/surgery.json. Target: under 10 s per model (2 CPU
cores), at the default 224x224 input, weights=None.
"""

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd.latency import timing  # noqa: E402

MODELS = {
    "ResNet50": keras.applications.ResNet50,
    "DenseNet121": keras.applications.DenseNet121,
}


def time_model(name: str, keep: float) -> dict:
    model = MODELS[name](weights=None)
    t0 = time.perf_counter()
    groups = kc.channel_groups(model)
    t1 = time.perf_counter()
    plan = kc.make_plan(model, keep=keep)
    t2 = time.perf_counter()
    small = kc.slim(model, plan)
    t3 = time.perf_counter()
    return {
        "model": name,
        "groups": len(groups),
        "prunable_groups": sum(g.prunable for g in groups),
        "channel_groups_s": round(t1 - t0, 3),
        "make_plan_s": round(t2 - t1, 3),
        "slim_s": round(t3 - t2, 3),
        "total_s": round(t3 - t0, 3),
        "macs_ratio": kc.count_macs(small) / kc.count_macs(model),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=float, default=0.625)
    parser.add_argument(
        "--out", default=os.path.join(
            os.path.dirname(__file__), "results", "surgery.json"
        )
    )
    args = parser.parse_args()
    rows = [time_model(name, args.keep) for name in MODELS]
    for r in rows:
        print(
            f"{r['model']:12s} groups {r['channel_groups_s']:.2f}s  "
            f"plan {r['make_plan_s']:.2f}s  slim {r['slim_s']:.2f}s  "
            f"total {r['total_s']:.2f}s  MACs x{r['macs_ratio']:.3f}"
        )
    result = {
        "command": "python benchmarks/surgery.py",
        "machine": {**timing.machine(), **timing.versions()},
        "keras": keras.__version__,
        "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
