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
3. *Recover*: `kc.fine_tune(slim, teacher=teacher)` for `recover_epochs`,
   distilling the teacher's logits (KL divergence, `--temperature`,
   `--alpha`).
4. *Scratch*: the slim architecture from random weights, trained on the
   labels for `pretrain_epochs + recover_epochs`, the same total steps.
5. *Latency*: teacher and slim model timed interleaved at batch 1
   (`kc.latency.time_against_full`, `--runtime`).

Held-out perplexity is `exp` of the mean cross-entropy per byte on the held
out files. Writes `benchmarks/results/lm_width_<profile>.json` (or
`--out`) with the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from cifar10 import command, dump_json, machine  # noqa: E402
from keras import layers as L  # noqa: E402

import keras_csgd as kc  # noqa: E402
from keras_csgd.recover import evaluate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
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
    calibration_batches: int


PROFILES = {
    "smoke": Profile(seq_len=32, dim=32, heads=4, mlp=64, depth=1,
                     train_bytes=16_000, eval_bytes=4_000, batch_size=32,
                     pretrain_epochs=1, recover_epochs=1,
                     learning_rate=3e-3, calibration_batches=2),
    "quick": Profile(seq_len=64, dim=96, heads=4, mlp=384, depth=2,
                     train_bytes=1_200_000, eval_bytes=100_000,
                     batch_size=32, pretrain_epochs=4, recover_epochs=3,
                     learning_rate=3e-3, calibration_batches=8),
    "full": Profile(seq_len=256, dim=256, heads=8, mlp=1024, depth=6,
                    train_bytes=None, eval_bytes=None, batch_size=64,
                    pretrain_epochs=10, recover_epochs=3,
                    learning_rate=1e-3, calibration_batches=32),
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
          temperature=1.0, alpha=1.0, seed=0):
    """`kc.fine_tune` of `model` on `data` (distilled from `teacher`)."""
    return kc.fine_tune(
        model, batches(*data, profile.batch_size, seed), teacher=teacher,
        validation_data=held_out, epochs=epochs,
        learning_rate=profile.learning_rate, optimizer=adamw,
        temperature=temperature, alpha=alpha, seed=seed, verbose=0,
    )


# ------------------------------------------------------------- pruning
def plan_for_params(model, scores, target, tolerance=0.02):
    """The plan of one `keep` for every scored group whose slim model has
    about `target` of `model`'s parameters (bisection on `keep`).

    Returns:
        `(plan, slim model, keep)`.
    """
    full = model.count_params()
    lo, hi, best = 0.05, 1.0, None
    for _ in range(12):
        keep = (lo + hi) / 2
        plan = kc.plan_from_scores(model, scores, keep=keep)
        slim = kc.slim(model, plan)
        ratio = slim.count_params() / full
        if best is None or abs(ratio - target) < abs(best[3] - target):
            best = (plan, slim, keep, ratio)
        if abs(ratio - target) <= tolerance:
            break
        lo, hi = (keep, hi) if ratio < target else (lo, keep)
    return best[:3]


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

    clock = time.perf_counter()
    teacher = decoder_lm(profile, "teacher")
    report = train(teacher, data, held_out, profile.pretrain_epochs,
                   profile, seed=args.seed)
    teacher_ppl = math.exp(report.loss_after)
    result["teacher"] = {
        "params": teacher.count_params(), "perplexity": teacher_ppl,
        "steps": steps * profile.pretrain_epochs,
        "seconds": round(time.perf_counter() - clock, 1)}
    print(f"teacher: held-out perplexity {teacher_ppl:.3f}", flush=True)

    clock = time.perf_counter()
    calibration = data[0][: profile.calibration_batches * profile.batch_size]
    scores = kc.methods.activation_importance(
        teacher, calibration, batch_size=profile.batch_size)
    plan, slim, keep = plan_for_params(teacher, scores, args.params)
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
                   alpha=args.alpha, seed=args.seed)
    pruned["perplexity_after_recovery"] = math.exp(report.loss_after)
    pruned["recovery_steps"] = steps * profile.recover_epochs
    pruned["recovery_seconds"] = round(time.perf_counter() - clock, 1)
    result["pruned"] = pruned
    print(f"recovered: perplexity {pruned['perplexity_after_recovery']:.3f}",
          flush=True)

    clock = time.perf_counter()
    scratch = keras.models.clone_model(slim)  # new random weights
    epochs = profile.pretrain_epochs + profile.recover_epochs
    report = train(scratch, data, held_out, epochs, profile, seed=args.seed)
    result["scratch"] = {
        "params": scratch.count_params(),
        "perplexity": math.exp(report.loss_after),
        "steps": steps * epochs,
        "seconds": round(time.perf_counter() - clock, 1)}
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
        "better_than_scratch": after < result["scratch"]["perplexity"],
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
    parser.add_argument("--alpha", type=float, default=1.0,
                        help="weight of the distillation loss")
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--text-dir", default=None,
                        help="folder of .py files (the standard library)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    result = {
        "command": command("lm_width.py", argv),
        "profile": args.profile,
        "settings": {**dataclasses.asdict(profile), "params": args.params,
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
