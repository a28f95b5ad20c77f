"""Tables, plot and claims' verdicts from the CIFAR-10 benchmark's JSON.

    .venv/bin/python benchmarks/make_tables.py [--readme README.md]

Reads every `benchmarks/results/<model>_<method>_<profile>_s<seed>.json`
written by `benchmarks/cifar10.py` and writes:

- `benchmarks/results/RESULTS.md`: one table per (model, profile), every row
  with the commands that produced it, mean and spread (sample standard
  deviation) over seeds, then the verdicts on the papers' claims;
- `benchmarks/results/claims.json`: the verdicts (true, false or
  "not run") with the numbers behind them;
- `benchmarks/results/accuracy_vs_macs.png`: validation accuracy against
  the MACs ratio;
- with `--readme`, the same tables between the markers
  `<!-- benchmark-results:start -->` and `<!-- benchmark-results:end -->`
  of that file (left as it is when it has no markers).

Everything comes from the JSON: a number nobody ran does not appear.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
START = "<!-- benchmark-results:start -->"
END = "<!-- benchmark-results:end -->"
METHOD_ORDER = (
    "scratch", "magnitude", "csgd", "asfp", "sfp", "ensembles", "similarity",
    "functionality", "adaptive", "cap", "gsm",
)
GSM_MAX_LOSS = 0.005  # claim 5: at most 0.5 points
MACS_TOLERANCE = 0.02  # "equal MACs": ratios within 2 points of the base
NOT_RUN = "not run"


# ------------------------------------------------------------- reading
def load_results(folder, profiles=("quick", "full")) -> list[dict]:
    """The benchmark runs in `folder` of the given profiles."""
    runs = []
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        with open(path) as f:
            try:
                run = json.load(f)
            except json.JSONDecodeError:
                continue
        if not isinstance(run, dict) or not {
            "method", "accuracy", "macs", "profile"
        } <= run.keys():
            continue
        if run["profile"] in profiles:
            runs.append(run)
    return runs


def group_runs(runs) -> dict:
    """`{(model, profile): {method: [runs by seed]}}` (default keep only)."""
    out = defaultdict(lambda: defaultdict(list))
    for run in runs:
        out[(run["model"], run["profile"])][run["method"]].append(run)
    for methods in out.values():
        for seeds in methods.values():
            seeds.sort(key=lambda r: r["seed"])
    return out


class Stat:
    """Mean and sample standard deviation of one quantity over seeds."""

    def __init__(self, values):
        self.values = [float(v) for v in values if v is not None]
        self.n = len(self.values)
        self.mean = float(np.mean(self.values)) if self.n else None
        self.sd = float(np.std(self.values, ddof=1)) if self.n > 1 else None

    def points(self, digits=2) -> str:
        """As percentage points, `mean ± sd` when there are seeds."""
        if self.mean is None:
            return "–"
        text = f"{100 * self.mean:.{digits}f}"
        return text + (f" ± {100 * self.sd:.{digits}f}" if self.sd else "")

    def as_dict(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


def base_stat(methods, key="accuracy") -> Stat:
    """`Stat` of the base model's `run[key]["base"]`, one per base seed."""
    by_seed = {
        r.get("base_seed", r["seed"]): (r.get(key) or {}).get("base")
        for seeds in methods.values() for r in seeds
    }
    return Stat(by_seed.values())


def stat(seeds, *keys) -> Stat:
    """`Stat` of `run[keys[0]][keys[1]]...` over the seeds' runs."""
    values = []
    for run in seeds:
        value = run
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        values.append(value)
    return Stat(values)


# -------------------------------------------------------------- claims
def _verdict(better: Stat, worse: Stat, margin=0.0):
    """`better.mean - worse.mean > margin` with a note on the spread."""
    if better.mean is None or worse.mean is None:
        return NOT_RUN, None, None
    diff = better.mean - worse.mean
    note = None
    if abs(diff) < 0.01:
        spread = max(better.sd or 0.0, worse.sd or 0.0)
        if min(better.n, worse.n) < 2:
            note = "difference under 1 point from a single seed: run 2+ seeds"
        elif abs(diff) <= spread:
            note = "difference within the seed spread"
    return bool(diff > margin), round(100 * diff, 3), note


def _claim(verdict, statement, **evidence) -> dict:
    return {"statement": statement, "verdict": verdict, **evidence}


def claims(methods: dict) -> dict:
    """The six verdicts for one (model, profile), from its runs only."""
    get = lambda m: methods.get(m, [])  # noqa: E731
    out = {}

    csgd = get("csgd")
    if csgd:
        tolerance = max(1 / r["data"]["val_images"] for r in csgd)
        gaps = [
            abs(r["accuracy"]["slim"] - r["accuracy"]["trained"]) for r in csgd
        ]
        out["1"] = _claim(
            bool(max(gaps) <= tolerance),
            "C-SGD: the slim model's accuracy equals the trained model's",
            max_gap_points=round(100 * max(gaps), 3),
            tolerance_points=round(100 * tolerance, 3),
            max_abs_logit_difference=max(
                r["details"].get("max_abs_logit_difference", np.nan)
                for r in csgd
            ),
            seeds=len(csgd),
        )
    else:
        out["1"] = _claim(
            NOT_RUN,
            "C-SGD: the slim model's accuracy equals the trained model's",
        )

    verdict, diff, note = _verdict(
        stat(csgd, "accuracy", "final"), stat(get("scratch"), "accuracy",
                                              "final")
    )
    out["2"] = _claim(
        verdict,
        "C-SGD beats the same narrow network trained from scratch for the "
        "same total epochs",
        difference_points=diff, note=note,
    )

    asfp, sfp = get("asfp"), get("sfp")
    verdict, diff, note = _verdict(
        stat(asfp, "accuracy", "slim"), stat(sfp, "accuracy", "slim")
    )
    tuned = _verdict(
        stat(asfp, "accuracy", "finetuned"), stat(sfp, "accuracy", "finetuned")
    )
    out["3"] = _claim(
        verdict,
        "ASFP beats constant-rate SFP at equal MACs (slim, no fine-tuning)",
        difference_points=diff, note=note,
        after_short_finetune={"verdict": tuned[0],
                              "difference_points": tuned[1]},
        equal_macs=_equal_macs(asfp, sfp),
    )

    cap = get("cap")
    verdict, diff, note = _verdict(
        stat(cap, "accuracy", "slim"),
        stat(cap, "details", "plain_removal_accuracy"),
    )
    out["4"] = _claim(
        verdict,
        "CaP compensation beats plain channel removal, no fine-tuning",
        difference_points=diff, note=note,
    )

    gsm = get("gsm")
    if gsm:
        loss = Stat(
            [r["accuracy"]["base"] - r["accuracy"]["slim"] for r in gsm]
        )
        out["5"] = _claim(
            bool(loss.mean <= GSM_MAX_LOSS),
            "GSM at 10x compression loses at most 0.5 points",
            loss_points=round(100 * loss.mean, 3),
            loss_sd_points=None if loss.sd is None else round(
                100 * loss.sd, 3),
            density=stat(gsm, "details", "density").mean,
            seeds=loss.n,
        )
    else:
        out["5"] = _claim(
            NOT_RUN, "GSM at 10x compression loses at most 0.5 points"
        )

    out["6"] = _versus_magnitude(methods)
    return out


def _equal_macs(a, b):
    ra, rb = stat(a, "macs", "ratio"), stat(b, "macs", "ratio")
    if ra.mean is None or rb.mean is None:
        return None
    return bool(abs(ra.mean - rb.mean) <= MACS_TOLERANCE)


def _versus_magnitude(methods) -> dict:
    statement = (
        "every pruning method beats magnitude pruning + fine-tuning at "
        "equal MACs and epochs (scratch is not a pruning method)"
    )
    reference = methods.get("magnitude", [])
    ref = stat(reference, "accuracy", "final")
    per_method = {}
    for name in METHOD_ORDER:
        if name in ("magnitude", "scratch") or name not in methods:
            continue
        seeds = methods[name]
        if name == "gsm":
            per_method[name] = {
                "verdict": "n/a",
                "note": "unstructured sparsity: no MACs reduction",
            }
            continue
        verdict, diff, note = _verdict(stat(seeds, "accuracy", "final"), ref)
        epochs = {r["epochs"]["method"] for r in seeds}
        ref_epochs = {r["epochs"]["method"] for r in reference}
        notes = [note] if note else []
        if reference and epochs != ref_epochs:
            notes.append(
                f"epochs after the base model differ ({sorted(epochs)} vs "
                f"{sorted(ref_epochs)})"
            )
        if reference and not _equal_macs(seeds, reference):
            notes.append("MACs differ by more than 2 points")
        per_method[name] = {
            "verdict": verdict,
            "difference_points": diff,
            "note": "; ".join(notes) or None,
        }
    decided = [
        v["verdict"] for v in per_method.values()
        if isinstance(v["verdict"], bool)
    ]
    overall = all(decided) if decided else NOT_RUN
    return _claim(overall, statement, per_method=per_method)


# --------------------------------------------------------------- table
def _cell(text) -> str:
    return str(text).replace("|", "\\|")


def table(model, profile, methods) -> str:
    """One markdown table: a row per method, commands included."""
    test = any(r.get("test_accuracy") for s in methods.values() for r in s)
    lines = [
        f"### {model}, profile `{profile}`",
        "",
        "| method | seeds | MACs (M) | MACs cut | params (k) | before slim "
        "| after slim | fine-tuned | result | epochs after base "
        "| time (min) | " + ("test set | " if test else "") + "command |",
        "|" + "---|" * (13 if test else 12),
    ]
    base = base_stat(methods)
    base_test = base_stat(methods, "test_accuracy")
    any_run = next(iter(methods.values()))[0]
    lines.insert(1, f"\nValidation: {any_run['data']['validation']}.")
    lines.append(
        f"| base (trained once) | {base.n} "
        f"| {any_run['macs']['base'] / 1e6:.1f} | 0% "
        f"| {any_run['params']['base'] / 1e3:.0f} | {base.points()} "
        f"| | | {base.points()} | {any_run['epochs']['base']} (from random) "
        f"| {any_run['wall_seconds']['base_training'] / 60:.1f} | "
        + (f"{base_test.points()} | " if test else "")
        + "(cached by the first run) |"
    )
    for name in sorted(methods, key=_method_rank):
        seeds = methods[name]
        macs = stat(seeds, "macs", "final")
        cut = stat(seeds, "macs", "reduction")
        if name == "gsm":
            density = stat(seeds, "details", "density").mean
            cut_text = f"0% (density {density:.3f})"
        else:
            cut_text = f"{100 * cut.mean:.1f}%"
        headline = seeds[0]["headline"]
        epochs = seeds[0]["epochs"]["method"]
        if name == "scratch":
            total = seeds[0]["details"]["total_epochs_from_random"]
            epochs = f"{total} from random"
        commands = "<br>".join(f"`{_cell(r['command'])}`" for r in seeds)
        lines.append(
            f"| {name} | {len(seeds)} | {macs.mean / 1e6:.1f} | {cut_text} "
            f"| {stat(seeds, 'params', 'final').mean / 1e3:.0f} "
            f"| {stat(seeds, 'accuracy', 'trained').points()} "
            f"| {stat(seeds, 'accuracy', 'slim').points()} "
            f"| {stat(seeds, 'accuracy', 'finetuned').points()} "
            f"| **{stat(seeds, 'accuracy', 'final').points()}** ({headline}) "
            f"| {epochs} "
            f"| {stat(seeds, 'wall_seconds', 'method').mean / 60:.1f} | "
            + (f"{stat(seeds, 'test_accuracy', 'final').points()} | "
               if test else "")
            + f"{commands} |"
        )
    return "\n".join(lines)


def _method_rank(name):
    return METHOD_ORDER.index(name) if name in METHOD_ORDER else 99


def _verdict_text(v) -> str:
    return v if isinstance(v, str) else ("**true**" if v else "**false**")


def claims_text(found) -> str:
    lines = []
    for key, value in found.items():
        extra = {
            k: v for k, v in value.items()
            if k not in ("statement", "verdict", "per_method")
            and v is not None
        }
        detail = ", ".join(f"{k} {v}" for k, v in extra.items())
        lines.append(
            f"{key}. {value['statement']}: {_verdict_text(value['verdict'])}"
            + (f" ({detail})" if detail else "")
        )
        for name, sub in value.get("per_method", {}).items():
            diff = sub.get("difference_points")
            lines.append(
                f"    - {name}: {_verdict_text(sub['verdict'])}"
                + (f", {diff:+.2f} points" if diff is not None else "")
                + (f" ({sub['note']})" if sub.get("note") else "")
            )
    return "\n".join(lines)


def markdown(grouped, all_claims) -> str:
    parts = [
        "Accuracies are top-1 on a validation split held out of the "
        "CIFAR-10 training folder (the last images of a fixed shuffle, "
        "5,000 in `quick` and `full`), not the CIFAR-10 test set, in "
        "percent: mean ± sample "
        "standard deviation over seeds. \"result\" is the method's number "
        "after its epochs (see benchmarks/README.md); GSM is unstructured "
        "(density, no MACs cut). Generated by `benchmarks/make_tables.py` "
        "from `benchmarks/results/*.json`.",
    ]
    for (model, profile), methods in sorted(grouped.items()):
        parts += [
            table(model, profile, methods),
            f"Claims ({model}, `{profile}`):\n\n"
            + claims_text(all_claims[f"{model}/{profile}"]),
        ]
    if not grouped:
        parts.append("No benchmark results yet.")
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------- plot
def plot(grouped, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(grouped)
    fig, axes = plt.subplots(
        1, max(1, len(keys)), figsize=(6 * max(1, len(keys)), 4.5),
        squeeze=False,
    )
    for ax, key in zip(axes[0], keys):
        methods = grouped[key]
        base = base_stat(methods)
        ax.errorbar([1.0], [100 * base.mean], yerr=[100 * (base.sd or 0)],
                    fmt="*", markersize=12, color="black", label="base")
        for name in sorted(methods, key=_method_rank):
            if name == "gsm":
                continue
            seeds = methods[name]
            x = stat(seeds, "macs", "ratio")
            y = stat(seeds, "accuracy", "final")
            ax.errorbar([x.mean], [100 * y.mean], yerr=[100 * (y.sd or 0)],
                        fmt="o", capsize=3, label=name)
        ax.set_title(f"{key[0]}, {key[1]} (GSM: unstructured, not shown)")
        ax.set_xlabel("MACs / base MACs")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- main
def update_readme(path, text) -> bool:
    """Replaces the text between the markers; `False` without markers."""
    with open(path) as f:
        content = f.read()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if not pattern.search(content):
        return False
    new = pattern.sub(lambda _: f"{START}\n{text}{END}", content)
    with open(path, "w") as f:
        f.write(new)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    parser.add_argument(
        "--profiles", default="quick,full",
        help="comma-separated profiles to include (default quick,full)",
    )
    parser.add_argument("--readme", help="also update this file's section")
    args = parser.parse_args(argv)
    runs = load_results(args.results_dir, tuple(args.profiles.split(",")))
    grouped = group_runs(runs)
    all_claims = {
        f"{model}/{profile}": claims(methods)
        for (model, profile), methods in sorted(grouped.items())
    }
    text = markdown(grouped, all_claims)
    with open(os.path.join(args.results_dir, "RESULTS.md"), "w") as f:
        f.write("# CIFAR-10 benchmark results\n\n" + text)
    with open(os.path.join(args.results_dir, "claims.json"), "w") as f:
        json.dump(all_claims, f, indent=2)
        f.write("\n")
    if grouped:
        plot(grouped, os.path.join(args.results_dir, "accuracy_vs_macs.png"))
    if args.readme and not update_readme(args.readme, text):
        print(f"{args.readme}: no {START} ... {END} markers; not changed.")
    print(text)
    return all_claims


if __name__ == "__main__":
    main()
