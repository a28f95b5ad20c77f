"""Coverage of keras_hub's zoo: what keras_csgd can prune, family by family.

    .venv/bin/python benchmarks/hub_coverage.py [--families Llama BERT]

Builds every family of `tests/hub_zoo.py` small, with random weights (no
download), and reports: prunable groups, the share of the MACs they hold,
the MACs ratio of keep=0.5 on every prunable group, whether collapse-then-
slim is exact, `count_macs` against an independent count of every
Conv/Dense/EinsumDense call (`tests/mac_reference.py`), whether the
family meets issue 23's target (`meets_target`), and what freezes and
why. Shares and ratios are of the independent count, which also sees
the work inside layers keras_csgd does not know yet. Writes
benchmarks/results/hub_coverage.json and the Markdown table
benchmarks/results/hub_coverage.md (quoted in the README); with
`--families`, only their rows change (each row names the command that
made it). A few minutes on two CPU cores.
"""

import argparse
import collections
import json
import os
import re
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import keras  # noqa: E402
import numpy as np  # noqa: E402
from cifar10 import command, machine  # noqa: E402

import keras_csgd as kc  # noqa: E402
from hub_zoo import FAMILIES, inputs, outputs  # noqa: E402
from keras_csgd import graph  # noqa: E402
from mac_reference import reference_macs  # noqa: E402
from utils import collapse, relative_error  # noqa: E402


def _error(a, b) -> float:
    return max(keras.tree.flatten(
        keras.tree.map_structure(relative_error, a, b)))


def _held(an) -> int:
    """MACs of the calls that read or write a prunable group."""
    prunable = {an.gid_of[g.name] for g in an.groups if g.prunable}
    return sum(c.macs for c in an.costs
               if any(prunable.intersection(graph.leaves(an.root(lay)))
                      for lay in c.layouts))


def _one_line(reason: str, most: int = 160) -> str:
    """A reason on one line for a table cell: no colour codes or breaks,
    at most `most` characters."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", reason).split())
    return text if len(text) <= most else text[: most - 3] + "..."


def _freezes(groups, most: int = 3) -> list[str]:
    """The commonest reasons groups freeze: the first, without the layer's
    name (`unsupported layer (MLP)`), and how many groups give it."""
    reasons = collections.Counter(
        _one_line(re.sub(r" `[^`]*`", "", g.reason.split("; ")[0]))
        for g in groups
        if not g.prunable and "model input" not in g.reason)
    return [f"{r}: {n}" for r, n in reasons.most_common(most)]


def cover(name: str) -> dict:
    family = FAMILIES[name]
    t0 = time.perf_counter()
    model = family.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with graph.static_inputs(model, family.input_shape) as static:
            an = graph.analyze(static)
        # Groups that hold no variable (the positions of attention scores
        # on a last axis) are no channels of the model.
        groups = [g for g in kc.channel_groups(model)
                  if g.members or g.consumers]
        prunable = [g for g in groups if g.prunable]
        full = kc.count_macs(model, input_shape=family.input_shape)
        reference = reference_macs(model, inputs(model, family.kind, n=1))
        x = inputs(model, family.kind)
        row = {
            "family": name,
            "groups": len(groups),
            "prunable_groups": len(prunable),
            "macs": full,
            "reference_macs": reference,
            "count_vs_reference": round(full / max(reference, 1), 4),
            "uncounted": an.uncounted,
            # Of all the work, the independent count's where it is larger.
            "prunable_macs_share": round(
                _held(an) / max(full, reference, 1), 4),
            "freezes": _freezes(groups),
        }
        if prunable:
            plan = kc.make_plan(model, keep=0.5, method="kmeans")
            collapse(model, plan)
            small = kc.slim(model, plan)
            row["keep_0.5_counted_macs_ratio"] = round(kc.macs_under(
                model, plan, input_shape=family.input_shape) / full, 4)
        else:
            small = kc.slim(model, kc.PruningPlan({}))
        # A decoder LLM's logits: its output narrows with its hidden width.
        row["slim_error"] = _error(outputs(small, x, model), outputs(model, x))
        # The real ratio: of the independent counts, slim over full.
        row["keep_0.5_macs_ratio"] = round(reference_macs(
            small, inputs(model, family.kind, n=1)) / max(reference, 1), 4)
    row["exact"] = bool(row["slim_error"] < 1e-4)
    row["meets_target"] = meets_target(row)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def meets_target(row) -> bool:
    """Issue 23's target for one family: `keep=0.5` on every prunable
    group cuts the MACs to 0.65x or less, exactly, and `count_macs` is
    within 5% of the independent count."""
    return bool(row["keep_0.5_macs_ratio"] <= 0.65 and row["exact"]
                and abs(row["count_vs_reference"] - 1) <= 0.05)


def markdown(rows) -> str:
    met = sum(meets_target(r) for r in rows)
    lines = [
        f"{met} of {len(rows)} families meet the target (keep=0.5 at "
        "0.65x of the MACs or less, exact, `count_macs` within 5%).",
        "",
        "| family | prunable groups | MACs in them | keep=0.5 MACs | exact "
        "| count_macs / independent | target | what freezes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        uncounted = (f", {len(r['uncounted'])} calls not counted"
                     if r["uncounted"] else "")
        lines.append(
            f"| {r['family']} | {r['prunable_groups']}/{r['groups']} "
            f"| {r['prunable_macs_share']:.0%} "
            f"| {r['keep_0.5_macs_ratio']:.2f}x "
            f"| {'yes' if r['exact'] else 'NO'} "
            f"| {r['count_vs_reference']:.2f}{uncounted} "
            f"| {'yes' if meets_target(r) else 'NO'} "
            f"| {'; '.join(r['freezes']) or '-'} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--families", nargs="*", default=sorted(FAMILIES),
                        choices=sorted(FAMILIES))
    parser.add_argument("--out", default=os.path.join(
        HERE, "results", "hub_coverage.json"))
    args = parser.parse_args()
    rows = []
    for name in args.families:
        rows.append(cover(name))
        r = rows[-1]
        print(f"{name:15s} groups {r['prunable_groups']:3d}/{r['groups']:3d} "
              f"share {r['prunable_macs_share']:.2f} "
              f"keep0.5 {r['keep_0.5_macs_ratio']:.2f}x "
              f"exact {r['exact']} count/ref {r['count_vs_reference']:.2f} "
              f"target {r['meets_target']} {r['seconds']:.1f}s", flush=True)
    run = command("hub_coverage.py")
    for r in rows:
        r["command"] = run
    result = {"command": run, "machine": machine(),
              "keras_hub": _hub_version(), "rows": _merged(args.out, rows)}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=_plain)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
        f.write(markdown(result["rows"]))


def _merged(path: str, rows: list) -> list:
    """`rows` with the other families' rows of the table at `path` (a run
    of a few `--families` updates their rows; each row names the command
    that made it)."""
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        old = {r["family"]: r for r in json.load(f)["rows"]}
    old.update({r["family"]: r for r in rows})
    return [old[name] for name in sorted(old)]


def _hub_version() -> str:
    import keras_hub

    return keras_hub.__version__


def _plain(value):
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    main()
