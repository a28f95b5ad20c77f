"""A small decoder LM, width-pruned to half its parameters, then distilled.

    .venv/bin/python benchmarks/lm_width.py --profile quick   # 2 CPU cores
    .venv/bin/python benchmarks/lm_width.py --profile full    # a GPU

Minitron's recipe (Muralidharan et al., arXiv 2407.14679) on a byte-level
language model, offline: the text is Python's own standard library (the
`.py` files of `sysconfig.get_paths()["stdlib"]`, one byte one token, a
vocabulary of 256; every tenth file, in name order, is held out).

1. *Teacher*: a pre-norm decoder (`decoder_lm`: token and position
   embeddings, causal `MultiHeadAttention`, a GELU MLP, `Dense` logits)
   trained for `pretrain_epochs` with `kc.fine_tune` (AdamW, cosine).
2. *Prune*: `kc.methods.activation_importance` on a few calibration
   batches scores the heads, MLP units and every other prunable group (the
   hidden width where the analysis makes it prunable); one `keep` for all
   groups, found by bisection, brings the slim model to about `--params`
   of the teacher's parameters (`kc.plan_from_scores`, `kc.slim`).
   `--hidden-keep` / `--heads-keep` fix those axes' fractions instead
   (Minitron keeps the heads and 3/4 of the hidden width).
3. *Recover*: `kc.fine_tune(slim, teacher=teacher)` for `recover_epochs`,
   half on the teacher's logits (KL divergence at `--temperature` 1),
   half on the labels (`--alpha 0.5`), at a cosine learning rate whose
   peak, `recover_lr`, is twice the teacher's (`--recover-lr`, optionally
   after a linear `--warmup`).
4. *Scratch*: the slim architecture from random weights, trained on the
   labels for `pretrain_epochs + recover_epochs`, the same total steps, on
   the teacher's schedule (`--scratch-lr`).
5. *Latency*: teacher and slim model timed interleaved at batch 1
   (`kc.latency.time_against_full`, `--runtime`).

The recipe was chosen among seven variants on the `quick` profile (README,
"Width pruning a small language model"): Minitron's logit-only
distillation (`--alpha 1`) stayed behind the model trained from scratch;
adding the label loss and doubling the recovery's peak learning rate put
the pruned model ahead of it. The trained teacher and each scratch run are
cached under `benchmarks/cache/` (git-ignored), keyed by their settings,
so variants reuse them (`"cached"` in the JSON).

Held-out perplexity is `exp` of the mean cross-entropy per byte on the held
out files. Writes `benchmarks/results/lm_width_<profile>.json` (or
`--out`) with the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import sys
import sysconfig
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from cifar10 import (  # noqa: E402
    command,
    dump_json,
    machine,
    write_atomically,
)
from keras import layers as L  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd.recover import evaluate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ALPHA = 0.5  # weight of the distillation loss; the labels weigh the rest
CACHE = os.path.join(HERE, "cache")
VOCABULARY = 256


@dataclasses.dataclass(frozen=True)
class Profile:
    seq_len: int
    dim: int
    heads: int
    mlp: int
    depth: int
    train_bytes: int  # most bytes of training text (None: all)
    eval_bytes: int
    batch_size: int
    pretrain_epochs: int
    recover_epochs: int
    learning_rate: float
    recover_lr: float  # peak of the recovery: twice the teacher's
    calibration_batches: int


PROFILES = {
    "smoke": Profile(seq_len=32, dim=32, heads=4, mlp=64, depth=1,
                     train_bytes=16_000, eval_bytes=4_000, batch_size=32,
                     pretrain_epochs=1, recover_epochs=1,
                     learning_rate=3e-3, recover_lr=6e-3,
                     calibration_batches=2),
    "quick": Profile(seq_len=64, dim=96, heads=4, mlp=384, depth=2,
                     train_bytes=1_200_000, eval_bytes=100_000,
                     batch_size=32, pretrain_epochs=4, recover_epochs=3,
                     learning_rate=3e-3, recover_lr=6e-3,
                     calibration_batches=8),
    "full": Profile(seq_len=256, dim=256, heads=8, mlp=1024, depth=6,
                    train_bytes=None, eval_bytes=None, batch_size=64,
                    pretrain_epochs=10, recover_epochs=3,
                    learning_rate=1e-3, recover_lr=2e-3,
                    calibration_batches=32),
}


# ------------------------------------------------------------- the text
def text_files(root=None) -> list[pathlib.Path]:
    """The standard library's top-level `.py` files, in name order."""
    root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"))


def byte_corpus(files, held_out_every=10, train_bytes=None,
                eval_bytes=None) -> tuple[np.ndarray, np.ndarray]:
    """`(train, held_out)` byte tokens: every `held_out_every`-th file held
    out, the files of each part concatenated, cut to the byte budgets."""
    parts = ([], [])
    for i, path in enumerate(files):
        parts[i % held_out_every == held_out_every - 1].append(
            path.read_bytes())
    train, held = (np.frombuffer(b"".join(p), np.uint8).astype(np.int32)
                   for p in parts)
    return train[:train_bytes], held[:eval_bytes]


def windows(tokens, seq_len) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping `(inputs, next bytes)` windows of `seq_len`."""
    n = (len(tokens) - 1) // seq_len
    x = tokens[: n * seq_len].reshape(n, seq_len)
    y = tokens[1: n * seq_len + 1].reshape(n, seq_len)
    return x, y


def batches(x, y, batch_size, seed=0):
    """A shuffled `tf.data` pipeline of `(inputs, next bytes)` batches."""
    return (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(len(x), seed=seed).batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))


def perplexity(model, x, y) -> float:
    """`exp` of the mean cross-entropy per token of `model` on `(x, y)`."""
    return math.exp(evaluate(model, x, y)[1])


# ------------------------------------------------------------- the model
def decoder_lm(profile: Profile, name="decoder_lm") -> keras.Model:
    """A pre-norm byte-level decoder of `keras.layers` (and keras_hub's
    `PositionEmbedding`): token ids `(batch, seq_len)` to logits."""
    from keras_hub.layers import PositionEmbedding

    p = profile
    tokens = keras.Input((p.seq_len,), dtype="int32", name="tokens")
    x = L.Embedding(VOCABULARY, p.dim, name="embedding")(tokens)
    x = L.Add()([x, PositionEmbedding(p.seq_len, name="positions")(x)])
    for b in range(p.depth):
        h = L.LayerNormalization(epsilon=1e-5, name=f"b{b}_ln1")(x)
        h = L.MultiHeadAttention(p.heads, p.dim // p.heads,
                                 name=f"b{b}_attention")(
            h, h, use_causal_mask=True)
        x = L.Add()([x, h])
        h = L.LayerNormalization(epsilon=1e-5, name=f"b{b}_ln2")(x)
        h = L.Dense(p.mlp, activation="gelu", name=f"b{b}_mlp_up")(h)
        x = L.Add()([x, L.Dense(p.dim, name=f"b{b}_mlp_down")(h)])
    x = L.LayerNormalization(epsilon=1e-5, name="final_ln")(x)
    return keras.Model(tokens, L.Dense(VOCABULARY, name="logits")(x),
                       name=name)


def adamw(learning_rate):
    """The optimizer of every training run (`kc.fine_tune(optimizer=)`)."""
    return keras.optimizers.AdamW(learning_rate, weight_decay=0.01,
                                  clipnorm=1.0)


def train(model, data, held_out, epochs, profile, teacher=None,
          temperature=1.0, alpha=ALPHA, seed=0, learning_rate=None,
          warmup=0.0):
    """`kc.fine_tune` of `model` on `data` (distilled from `teacher`), at
    peak `learning_rate` (the profile's by default) after `warmup`."""
    return kc.fine_tune(
        model, batches(*data, profile.batch_size, seed), teacher=teacher,
        validation_data=held_out, epochs=epochs,
        learning_rate=learning_rate or profile.learning_rate,
        warmup=warmup, optimizer=adamw, temperature=temperature,
        alpha=alpha, seed=seed, verbose=0,
    )


def cached(name, settings):
    """The path (no extension) under `benchmarks/cache/` of what `settings`
    (a JSON-ready dict) determine."""
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode())
    return os.path.join(CACHE, f"lm_width_{name}_{key.hexdigest()[:10]}")


def teacher_key(profile, args) -> dict:
    """What the teacher depends on: the profile's model and training, the
    seed, the text folder."""
    fields = ("seq_len", "dim", "heads", "mlp", "depth", "train_bytes",
              "eval_bytes", "batch_size", "pretrain_epochs", "learning_rate")
    return {**{f: getattr(profile, f) for f in fields}, "seed": args.seed,
            "text": str(pathlib.Path(args.text_dir or sysconfig.get_paths()[
                "stdlib"]).resolve())}


def teacher_model(profile, data, held_out, args):
    """The trained teacher and its record, from the cache when it holds one
    for these settings (the profile, the seed, the text folder).

    Returns:
        `(teacher, {"params", "perplexity", "steps", "seconds", "cached"})`.
    """
    path = cached("teacher", teacher_key(profile, args))
    if os.path.isfile(path + ".keras") and os.path.isfile(path + ".json"):
        with open(path + ".json") as f:
            info = json.load(f)
        teacher = keras.models.load_model(path + ".keras", compile=False)
        return teacher, {**info, "cached": True}
    clock = time.perf_counter()
    teacher = decoder_lm(profile, "teacher")
    report = train(teacher, data, held_out, profile.pretrain_epochs,
                   profile, seed=args.seed)
    info = {"params": teacher.count_params(),
            "perplexity": math.exp(report.loss_after),
            "steps": math.ceil(len(data[0]) / profile.batch_size)
            * profile.pretrain_epochs,
            "seconds": round(time.perf_counter() - clock, 1)}
    os.makedirs(CACHE, exist_ok=True)
    write_atomically(path + ".keras", teacher.save)
    write_atomically(path + ".json", lambda tmp: dump_json(info, tmp))
    return teacher, {**info, "cached": False}


def scratch_run(slim, data, held_out, profile, args) -> dict:
    """The architecture of `slim` from random weights (seeded), trained on
    the labels for `pretrain_epochs + recover_epochs`; its record, from the
    cache when it holds one for these settings and widths."""
    epochs = profile.pretrain_epochs + profile.recover_epochs
    widths = [[layer.name, [list(w.shape) for w in layer.weights]]
              for layer in slim.layers]
    path = cached("scratch", {**teacher_key(profile, args),
                              "epochs": epochs, "widths": widths,
                              "learning_rate": args.scratch_lr
                              or profile.learning_rate})
    if os.path.isfile(path + ".json"):
        with open(path + ".json") as f:
            return {**json.load(f), "cached": True}
    clock = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    scratch = keras.models.clone_model(slim)  # new random weights
    report = train(scratch, data, held_out, epochs, profile, seed=args.seed,
                   learning_rate=args.scratch_lr)
    info = {"params": scratch.count_params(),
            "perplexity": math.exp(report.loss_after),
            "steps": math.ceil(len(data[0]) / profile.batch_size) * epochs,
            "seconds": round(time.perf_counter() - clock, 1)}
    os.makedirs(CACHE, exist_ok=True)
    write_atomically(path + ".json", lambda tmp: dump_json(info, tmp))
    return {**info, "cached": False}


# ------------------------------------------------------------- pruning
def plan_for_params(model, scores, target, fixed=None, tolerance=0.02):
    """The plan whose slim model has about `target` of `model`'s
    parameters: the groups of the kinds in `fixed` (`group_kinds`) keep
    their kind's fraction, all others one `keep`, found by bisection.

    Returns:
        `(plan, slim model, keep)`.
    """
    fixed = {name: keep for kind, names in group_kinds(model).items()
             for name in names for keep in [(fixed or {}).get(kind)]
             if keep is not None and name in scores}
    full = model.count_params()
    lo, hi, best = 0.05, 1.0, None
    for _ in range(12):
        keep = (lo + hi) / 2
        plan = plan_with_keeps(
            model, scores, {n: fixed.get(n, keep) for n in scores})
        slim = kc.slim(model, plan)
        ratio = slim.count_params() / full
        if best is None or abs(ratio - target) < abs(best[3] - target):
            best = (plan, slim, keep, ratio)
        if abs(ratio - target) <= tolerance:
            break
        lo, hi = (keep, hi) if ratio < target else (lo, keep)
    return best[:3]


def plan_with_keeps(model, scores, keeps) -> kc.PruningPlan:
    """One plan of `kc.plan_from_scores` per kept fraction of `keeps`
    (`{group: keep}`), joined."""
    clusters = {}
    for keep in set(keeps.values()):
        clusters.update(kc.plan_from_scores(
            model, {n: scores[n] for n, k in keeps.items() if k == keep},
            keep=keep).clusters)
    return kc.PruningPlan(clusters, groups=kc.channel_groups(model))


def group_kinds(model) -> dict[str, list[str]]:
    """The prunable groups of `model` by kind: heads, MLP, other."""
    kinds = {"heads": [], "mlp": [], "other": []}
    for g in kc.channel_groups(model):
        if g.prunable:
            kind = ("heads" if g.name.endswith("/heads") else
                    "mlp" if "mlp" in g.name else "other")
            kinds[kind].append(g.name)
    return kinds


# ------------------------------------------------------------- the run
def run(profile: Profile, args) -> dict:
    keras.utils.set_random_seed(args.seed)
    train_tokens, held_tokens = byte_corpus(
        text_files(args.text_dir), train_bytes=profile.train_bytes,
        eval_bytes=profile.eval_bytes)
    data = windows(train_tokens, profile.seq_len)
    held_out = windows(held_tokens, profile.seq_len)
    steps = math.ceil(len(data[0]) / profile.batch_size)
    result = {"data": {"train_bytes": int(len(train_tokens)),
                       "held_out_bytes": int(len(held_tokens)),
                       "train_windows": len(data[0]),
                       "steps_per_epoch": steps}}

    teacher, result["teacher"] = teacher_model(profile, data, held_out,
                                               args)
    teacher_ppl = result["teacher"]["perplexity"]
    keras.utils.set_random_seed(args.seed)  # the same, cached or not
    print(f"teacher: held-out perplexity {teacher_ppl:.3f}", flush=True)

    clock = time.perf_counter()
    calibration = data[0][: profile.calibration_batches * profile.batch_size]
    scores = kc.methods.activation_importance(
        teacher, calibration, batch_size=profile.batch_size)
    plan, slim, keep = plan_for_params(
        teacher, scores, args.params,
        {"other": args.hidden_keep, "heads": args.heads_keep})
    pruned = {
        "keep": keep, "params": slim.count_params(),
        "params_ratio": slim.count_params() / teacher.count_params(),
        "macs_ratio": kc.count_macs(slim) / kc.count_macs(teacher),
        "widths": {n: [w, plan.groups[n].size]
                   for n, w in plan.widths().items()},
        "groups": group_kinds(teacher),
        "perplexity_before_recovery": perplexity(slim, *held_out),
        "importance_seconds": round(time.perf_counter() - clock, 1)}
    print(f"pruned to {pruned['params_ratio']:.1%} of the parameters "
          f"(keep {keep:.3f}): perplexity "
          f"{pruned['perplexity_before_recovery']:.3f}", flush=True)

    clock = time.perf_counter()
    report = train(slim, data, held_out, profile.recover_epochs, profile,
                   teacher=teacher, temperature=args.temperature,
                   alpha=args.alpha, seed=args.seed,
                   learning_rate=args.recover_lr or profile.recover_lr,
                   warmup=args.warmup)
    pruned["perplexity_after_recovery"] = math.exp(report.loss_after)
    pruned["recovery_steps"] = steps * profile.recover_epochs
    pruned["recovery_seconds"] = round(time.perf_counter() - clock, 1)
    result["pruned"] = pruned
    print(f"recovered: perplexity {pruned['perplexity_after_recovery']:.3f}",
          flush=True)

    if args.scratch:
        result["scratch"] = scratch_run(slim, data, held_out, profile, args)
        print(f"scratch: perplexity {result['scratch']['perplexity']:.3f}",
              flush=True)

    full_ms, slim_ms, ratio = kc.latency.time_against_full(
        teacher, slim, runtime=args.runtime, batch_size=1)
    result["latency"] = {"runtime": args.runtime, "batch_size": 1,
                         "full_ms": full_ms, "slim_ms": slim_ms,
                         "ratio": ratio}
    after = pruned["perplexity_after_recovery"]
    result["targets"] = {
        "within_10_percent_of_teacher": after <= 1.1 * teacher_ppl,
        "better_than_scratch": after < result["scratch"]["perplexity"]
        if args.scratch else None,
        "recovered_over_teacher": after / teacher_ppl,
    }
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES),
                        default="quick")
    parser.add_argument("--params", type=float, default=0.5,
                        help="kept fraction of the parameters")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=ALPHA,
                        help="weight of the distillation loss (1: KL only)")
    parser.add_argument("--hidden-keep", type=float, default=None,
                        help="kept fraction of the hidden width (default: "
                        "the one keep of the other groups)")
    parser.add_argument("--heads-keep", type=float, default=None,
                        help="kept fraction of the heads (default: the one "
                        "keep of the other groups)")
    parser.add_argument("--recover-lr", type=float, default=None,
                        help="peak learning rate of the recovery (default: "
                        "the profile's recover_lr)")
    parser.add_argument("--warmup", type=float, default=0.0,
                        help="fraction of the recovery steps of linear "
                        "learning-rate warm-up")
    parser.add_argument("--calibration-batches", type=int, default=None,
                        help="batches scored (default: the profile's)")
    parser.add_argument("--scratch", action=argparse.BooleanOptionalAction,
                        default=True, help="train the slim architecture "
                        "from scratch too (cached by its shapes)")
    parser.add_argument("--scratch-lr", type=float, default=None,
                        help="peak learning rate from scratch (default: "
                        "the profile's)")
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--text-dir", default=None,
                        help="folder of .py files (the standard library)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.calibration_batches:
        profile = dataclasses.replace(
            profile, calibration_batches=args.calibration_batches)
    result = {
        "command": command("lm_width.py", argv),
        "profile": args.profile,
        "settings": {**dataclasses.asdict(profile), "params": args.params,
                     "hidden_keep": args.hidden_keep,
                     "heads_keep": args.heads_keep,
                     "recover_lr": args.recover_lr or profile.recover_lr,
                     "warmup": args.warmup,
                     "scratch_lr": args.scratch_lr or profile.learning_rate,
                     "temperature": args.temperature, "alpha": args.alpha,
                     "seed": args.seed},
        "machine": machine(),
        **run(profile, args),
    }
    out = args.out or os.path.join(HERE, "results",
                                   f"lm_width_{args.profile}.json")
    dump_json(result, out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
