"""Slim keras_hub LLM backbones as their own class.

`slim` builds a functional model. A keras_hub decoder backbone (Llama,
Gemma, ...) is more than its graph: its CausalLM reads its attributes
(`num_key_value_heads`, `head_dim`, `transformer_layers`, ...) to build the
key/value cache of `generate`, and `save_to_preset` writes its config. So
when every decoder block of the slim model has the same widths (what
uniform keeps give), the backbone is rebuilt *as its own class* from its
config with the new `num_query_heads`, `num_key_value_heads`,
`intermediate_dim`, `hidden_dim` (and `head_dim`), its weights copied
from the slim model, and checked against it on random tokens. The hidden
width may change: the CausalLM reads the backbone's output through the
backbone's own token embedding, which narrows with it
(`keras_csgd.layers.embedding.output_projection`). Merged hidden channels,
which the slim model's norms weigh, and Gemma's `sqrt(hidden_dim)` on the
embeddings are carried by a scaled stream (`_carry_stream`).

Where that cannot be, the functional model is returned with a warning: it
is the same slim model, but `generate` is not available for it. That is
for blocks of different widths, and for Llama, Qwen2, Phi3 and GPT-2 when
the slim `hidden_dim` is not `num_query_heads * head_dim`: their backbone
config has no `head_dim`, and both their attention layers
(`LlamaAttention.build`) and their CausalLM's key/value cache
(`LlamaCausalLM._build_cache`) derive it as `hidden_dim //
num_query_heads`. A backbone subclass with a pinned `head_dim` would fix
the first, not the second: `generate` would build its cache at the derived
size. A plan that keeps the same share of the hidden width as of the query
heads keeps the head size, and the class: one `keep` for every group
gives such plans (`keras_csgd.clusters.uniform_widths`, which reads the
groups `head_couplings` ties).
"""

from __future__ import annotations

import inspect
import warnings

import keras
import numpy as np

from keras_csgd import layers
from keras_csgd.graph.layout import leaves
from keras_csgd.rebuild import var_key

TOLERANCE = 1e-4


def own_class(model, slim_model):
    """`slim_model` as `model`'s keras_hub backbone class, if it can be.

    Args:
        model: the model `slim` was given.
        slim_model: the functional model `slim` built from it.

    Returns:
        A backbone of `model`'s class with `slim_model`'s weights, or
        `slim_model` (with a warning saying why) when `model` is a keras_hub
        decoder backbone that cannot keep its class; `slim_model` alone for
        every other model.
    """
    blocks = _decoder_blocks(slim_model)
    if not blocks or not is_decoder_backbone(model):
        return slim_model
    hidden = int(slim_model.outputs[0].shape[-1])
    why = _why_not(model, blocks, hidden) or _unweighed(model, slim_model)
    if why is None:
        config = _config(model, blocks, hidden)
        backbone = type(model).from_config(config)
        why = _copy_weights(slim_model, backbone)
        if why is None:
            _carry_stream(model, slim_model, backbone, hidden)
            why = _differs(slim_model, backbone)
        if why is None:
            return backbone
    warnings.warn(
        f"`slim` returns a functional model, not a {type(model).__name__}: "
        f"{why}. A CausalLM cannot wrap the functional model, so "
        "`generate` is not available for it.", stacklevel=3)
    return slim_model


def is_decoder_backbone(model) -> bool:
    """Whether `model` is a keras_hub decoder backbone (Llama, Gemma, GPT-2,
    ...): its slim model keeps its class, and `generate`, only when every
    decoder layer keeps the same widths."""
    return (type(model).__module__.startswith("keras_hub")
            and bool(_decoder_blocks(model)))


def _decoder_blocks(model) -> list:
    """The layers whose handler states their backbone's widths."""
    return [layer for layer in model.layers
            if hasattr(layers.handler_for(layer), "backbone_widths")]


def _widths(block) -> dict[str, int]:
    return layers.handler_for(block).backbone_widths(block)


def _why_not(model, blocks, hidden: int) -> str | None:
    """Why the slim blocks cannot form a backbone of `model`'s class."""
    widths = [_widths(b) for b in blocks]
    if any(w != widths[0] for w in widths[1:]):
        return ("its decoder layers have different widths ("
                + "; ".join(f"{b.name}: {w}" for b, w in zip(blocks, widths))
                + "); a plan with one `keep` for every layer keeps the class")
    key = _heads_key(model)
    heads = widths[0][key]
    size = widths[0]["head_dim"]
    if derives_head_size(model) and hidden != heads * size:
        return (f"{type(model).__name__} derives the head size as "
                f"`hidden_dim // {key}` ({hidden} // {heads} = "
                f"{hidden // heads}), and the "
                f"pruned heads keep theirs ({size}); a plan that keeps "
                f"`hidden_dim = {key} * {size}` (the same share of the "
                "hidden width as of the query heads) keeps the class")
    return None


def _unweighed(model, slim_model) -> str | None:
    """Why `model`'s class cannot weigh the slim model's merged hidden
    channels (`_carry_stream`), or `None`."""
    final = slim_model.get_layer(model.layer_norm.name)
    counts = set(getattr(final, "counts", None) or [1])
    if len(counts) == 1 or not _layer_norms(model):
        return None
    return ("its LayerNormalizations cannot weigh merged hidden channels of "
            f"different cluster sizes ({sorted(counts)}): a scaled stream "
            "weighs a mean and a variance differently (RMS norms, which "
            "have no mean, can)")


def _layer_norms(model) -> bool:
    """Whether `model`'s stream is normalised with a mean (GPT-2's
    LayerNormalizations), which a scaled stream cannot weigh."""
    return isinstance(model.layer_norm, keras.layers.LayerNormalization)


def unweighed_stream(model, an) -> set[str]:
    """The groups whose merges would cost `model` its class: the residual
    stream of a keras_hub decoder backbone whose class normalises it with a
    mean (GPT-2, `_unweighed`); `set()` for every other model. The plan
    makers that merge leave it out (`keras_csgd.clusters.mergeable`)."""
    if not is_decoder_backbone(model) or not _layer_norms(model):
        return set()
    return {_stream(model, an)} - {None}


def _stream(model, an) -> str | None:
    """The residual stream's group: that of the token embedding's columns
    (`None` if it has none)."""
    table = model.token_embedding.embeddings.path
    return next((g.name for g in an.groups
                 if any(path == table for _, path, _ in g.members)), None)


def _heads_key(model) -> str:
    """The config key of `model`'s (query) heads."""
    params = inspect.signature(type(model).__init__).parameters
    return next(k for k in ("num_query_heads", "num_heads") if k in params)


def derives_head_size(model) -> bool:
    """Whether `model` is a keras_hub decoder backbone whose class derives
    the head size as `hidden_dim // num_query_heads` (its config has no
    `head_dim`: Llama, Qwen2, Phi3, GPT-2)."""
    params = inspect.signature(type(model).__init__).parameters
    return "head_dim" not in params and is_decoder_backbone(model)


def head_couplings(model, an) -> list[tuple[str | None, list[str], int]]:
    """The groups whose widths `model`'s class ties by the head size.

    Args:
        model: the model `an` analyses.
        an: `graph.analyze(model)`.

    Returns:
        `(stream, heads, head size)` of every decoder block: the residual
        stream's group (that of the token embedding's columns; `None` if it
        has none) and the (query) heads' groups, when `model`'s class
        derives the head size (`derives_head_size`): it keeps its class
        when the slim stream is the kept heads times the head size. `[]`
        for every other model.
    """
    if not derives_head_size(model):
        return []
    stream = _stream(model, an)
    name_of = {gid: name for name, gid in an.gid_of.items()}
    key = _heads_key(model)
    out = []
    for block in _decoder_blocks(model):
        heads = an.widths.get(block.name, {}).get(key)
        if heads is not None:
            out.append((stream, [name_of.get(g) for g in
                                 leaves(an.root(heads))],
                        _widths(block)["head_dim"]))
    return out


def _config(model, blocks, hidden: int) -> dict:
    """`model`'s config with the slim blocks' widths."""
    config = model.get_config()
    widths = _widths(blocks[0])
    if "head_dim" not in config:
        del widths["head_dim"]
    config.update(widths, hidden_dim=hidden)
    return config


# Backbones that multiply their token embeddings by `sqrt(hidden_dim)`.
_SCALED_EMBEDDINGS = ("GemmaBackbone", "Gemma3Backbone")


def _carry_stream(model, slim_model, backbone, hidden: int) -> None:
    """Carries `backbone`'s residual stream scaled, where its class
    computes the slim model's function so.

    Two things of the slim model a backbone class cannot hold:

    - merged channels: the slim model's norms weigh each channel by its
      cluster's size (`ClusterNormalization` counts); a plain RMS norm over
      `w * x`, `w = sqrt(counts * hidden / sum(counts))`, computes the
      weighed statistics of `x`;
    - Gemma's `sqrt(hidden_dim)` on the embeddings: the slim model keeps
      the factor of `model`'s width, the class takes its own, a stream
      `sqrt(hidden / model.hidden_dim)` times the slim one.

    So the stream is carried as `factor * w * x`: the embedding table's
    columns times `w`, every block reading and writing it so
    (`layers.decoders.carry_stream`), the final norm's gain over `w`; over
    `w ** 2` where the output projection is the embedding's table (tied),
    whose columns it multiplies by `w` too: the backbone's output is then
    the slim model's over `w`, and their logits are equal (`_differs`).
    """
    final = slim_model.get_layer(backbone.layer_norm.name)
    counts = getattr(final, "counts", None)
    weights = np.ones(hidden) if counts is None else np.sqrt(
        np.asarray(counts) * hidden / np.sum(counts))
    factor = (np.sqrt(hidden / model.hidden_dim)
              if type(model).__name__ in _SCALED_EMBEDDINGS else 1.0)
    if factor == 1 and (weights == 1).all():
        return
    from keras_csgd.layers import decoders  # imports keras_hub

    table = backbone.token_embedding.embeddings
    table.assign(table.numpy() * weights.astype("float32"))
    for block in backbone.transformer_layers:
        decoders.carry_stream(block, weights, factor)
    tied = backbone.token_embedding.tie_weights
    decoders.times_gain(backbone.layer_norm, weights ** (-2 if tied else -1))


def _copy_weights(source, target) -> str | None:
    """Copies `source`'s weights into `target`, layer by name and variable
    by its path in the layer; why not, or `None`."""
    for layer in target.layers:
        if not layer.weights:
            continue
        try:
            old = source.get_layer(layer.name)
        except ValueError:
            return f"the slim model has no layer `{layer.name}`"
        values = {var_key(old, v): v for v in old.weights}
        for v in layer.weights:
            src = values.get(var_key(layer, v))
            if src is None or tuple(src.shape) != tuple(v.shape):
                return f"no weight for `{v.path}` of shape {v.shape}"
            v.assign(src)
    return None


def _differs(slim_model, backbone) -> str | None:
    """Why `backbone`'s logits (its output through its token embedding,
    as its CausalLM computes them) are not `slim_model`'s, or `None`."""
    rng = np.random.default_rng(0)
    feeds = {}
    for name, t in slim_model.input.items():
        shape = [d if d is not None else 8 for d in (2, *t.shape[1:])]
        if "mask" in name:
            feeds[name] = np.ones(shape, "int32")
        else:
            vocabulary = getattr(backbone, "vocabulary_size", 2)
            feeds[name] = rng.integers(0, vocabulary, shape).astype(t.dtype)
    name = backbone.token_embedding.name
    a = keras.ops.convert_to_numpy(
        slim_model.get_layer(name)(slim_model(feeds), reverse=True))
    b = keras.ops.convert_to_numpy(
        backbone.token_embedding(backbone(feeds), reverse=True))
    error = np.abs(a - b).max() / (1 + np.abs(a).max())
    if error > TOLERANCE:
        return f"the rebuilt backbone differs by {error:.3g}"
    return None
