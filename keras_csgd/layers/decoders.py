"""keras_hub's decoder blocks: grouped-query attention and gated MLPs.

The decoder LLMs of keras_hub (Llama, Mistral, Qwen2, Qwen3, Phi3, Gemma,
Gemma3) share one block: a normalized residual stream, a grouped-query
attention (query, key, value and output projections, rotary embeddings on
the head axis) and a gated MLP (`act(gate(x)) * up(x)`, then `down`). Their
`call` computes masks from the batch and sequence sizes and takes caches,
so they are *handled*, not traced; one handler serves every family, reading
the sub-layers by the few names the families give them. It declares:

- the **key/value heads** (`<block>/kv_heads`): the key and value kernels'
  head axis (and biases), and, with every query head of their group, the
  query kernel's and the output projection's head axis;
- the **query heads within a group** (`<block>/query_heads`, one channel
  per position in a key/value group): the query kernel's head axis reads
  the two groups as a grid (`Context.grid`: query head `k * g + j` uses
  key/value head `k`, as `ops.repeat` and Gemma's reshape pair them), so
  every key/value group keeps the same query positions, and a removed
  key/value head takes its query heads with it. Heads with equal
  projections compute equal outputs: merging sums their output-projection
  slices, exact. The head size is kept, so rotary embeddings (whose
  frequencies depend on it) are unchanged;
- the **MLP hidden units** (`<block>/mlp`): the gate and up kernels' output
  axis, the down kernel's input axis;
- the **residual stream** (the block's input and output): its RMS norms'
  scales are members, its query, key, value, gate and up kernels read it,
  the output and down projections write it. Merged channels are weighed
  by the norms of the rebuilt block (`norm_counts`: `ClusterNormalization`
  norms), so merges are exact; where the CausalLM's output projection is
  the tied embedding table (`keras_csgd.layers.embedding.output_projection`)
  too, the backbone's final norm taking the cluster sizes.

Rebuilt narrower, a block is a `Pruned...` subclass of its class (one per
family, serializable): its config holds the head size, which Llama, Qwen2
and Phi3 would otherwise derive as `hidden_dim // num_query_heads`, and
the norms' counts, and its `get_config` is written from the constructor's
arguments (Llama's reads a missing attribute, Qwen3's lacks `head_dim`).
A backbone class rebuilt by `kc.llm` holds plain norms: `carry_stream`
lets its blocks carry the stream scaled per channel instead, which an RMS
norm turns into the weighed statistics.
"""

from __future__ import annotations

import inspect
import math

import keras
import numpy as np

from keras_csgd.layers.attention import einsum_dense_spec, known_prod
from keras_csgd.layers.hub import StreamHandler, residual_input
from keras_csgd.layers.normalization import normalized_channels
from keras_csgd.layers.registry import (
    arguments,
    handler_for,
    register_layer,
    times,
)

_ATTENTION = ("_self_attention_layer", "attention")
_QUERY = ("_query_dense", "query_dense")
_KEY = ("_key_dense", "key_dense")
_VALUE = ("_value_dense", "value_dense")
_OUTPUT = ("_output_dense", "output_dense")
_GATE = ("_feedforward_gate_dense", "feedforward_gate_dense", "gating_ffw")
_UP = ("_feedforward_intermediate_dense", "feedforward_intermediate_dense",
       "gating_ffw_2")
_DOWN = ("_feedforward_output_dense", "feedforward_output_dense",
         "ffw_linear")
# The norms over the residual stream's channels: those that read it
# (Llama's and its kin's, Phi3's, Gemma's), and Gemma's after the
# attention and the MLP, which write into it (by the projection before
# them); the query and key norms are over the head size.
_READ_NORMS = ("_self_attention_layernorm", "_feedforward_layernorm",
               "pre_attention_layernorm", "post_attention_layernorm",
               "pre_attention_norm", "pre_ffw_norm")
_WRITE_NORMS = {"attention": "post_attention_norm", "mlp": "post_ffw_norm"}
_NORMS = (*_READ_NORMS, *_WRITE_NORMS.values())


def _attr(layer, names: tuple[str, ...]) -> str:
    """The first of `names` that `layer` has."""
    for name in names:
        if getattr(layer, name, None) is not None:
            return name
    raise ValueError(f"{type(layer).__name__} has none of {names}")


def sub_layer(layer, names: tuple[str, ...]):
    """The sub-layer of `layer` by the first of `names` it has."""
    return getattr(layer, _attr(layer, names))


def _axes(dense, output: bool = False) -> tuple[int, int, str]:
    """`(model axis, head axis, head letter)` of an attention kernel.

    Query, key and value: `"bqm,muh->bquh"` (Llama) or `"btd,ndh->btnh"`
    (Gemma); the output projection: `"bquh,uhm->bqm"`.
    """
    lhs, kernel = dense.equation.split("->")[0].split(",")
    out = dense.equation.split("->")[1]
    model, head = (out[-1], lhs[-2]) if output else (lhs[-1], out[-2])
    return kernel.index(model), kernel.index(head), head


def head_dim(block) -> int:
    """The head size of a decoder block (its query kernel's last axis)."""
    query = sub_layer(sub_layer(block, _ATTENTION), _QUERY)
    return int(query.kernel.shape[-1])


def block_widths(block) -> dict[str, int]:
    """The widths of a decoder block, as its backbone's config holds them."""
    return {"num_query_heads": block.num_query_heads,
            "num_key_value_heads": block.num_key_value_heads,
            "intermediate_dim": block.intermediate_dim,
            "head_dim": head_dim(block)}


def _stream(ctx, call):
    """The block's input and its layout, the residual stream.

    Its norms' scales are members, weighed when channels merge (the
    `Pruned...` block's `norm_counts`).
    """
    block = call.layer
    x, lay = residual_input(ctx, call)
    for name in _NORMS:
        norm = getattr(block, name, None)
        if norm is not None:
            normalized_channels(
                ctx, call, norm.weights,
                f"RMS normalization `{call.name}/{norm.name}`", lay,
                weighed=True)
    if "hidden_dim" in inspect.signature(type(block).__init__).parameters:
        ctx.width(call, "hidden_dim", lay)
    return x, lay


def _attention(ctx, call, attention, lay, rows):
    """The grouped-query heads of `attention`, reading and writing `lay`.

    Raises:
        ValueError: the attention scales its queries by `(hidden_dim //
            num_query_heads) ** -0.5` (Gemma's `query_head_dim_normalize
            =False`, which keras_hub 0.32's blocks never pass on), a size
            pruning would change.
    """
    if getattr(attention, "query_head_dim_normalize", True) is False:
        raise ValueError("its query scale is `(hidden_dim // "
                         "num_query_heads) ** -0.5`")
    block = call.layer
    query, key, value, output = (sub_layer(attention, n)
                                 for n in (_QUERY, _KEY, _VALUE, _OUTPUT))
    n_kv = block.num_key_value_heads
    kv = ctx.new_group(n_kv, f"{call.name}/kv_heads")
    positions = ctx.new_group(block.num_query_heads // n_kv,
                              f"{call.name}/query_heads")
    heads = ctx.grid(kv, positions)
    for dense, layout in ((query, heads), (key, kv), (value, kv)):
        model_axis, head_axis, letter = _axes(dense)
        ctx.consumer(call, dense.kernel, model_axis, lay)
        ctx.member(call, dense.kernel, head_axis, layout, producer=True)
        if dense.bias is not None:
            ctx.member(call, dense.bias, dense.bias_axes.index(letter),
                       layout)
        size = math.prod(dense.kernel.shape)
        ctx.cost(call, times(rows, size), lay,
                 *((kv, positions) if layout is heads else (kv,)))
    model_axis, head_axis, _ = _axes(output, output=True)
    ctx.consumer(call, output.kernel, head_axis, heads)
    ctx.member(call, output.kernel, model_axis, lay)
    if output.bias is not None:
        ctx.member(call, output.bias, 0, lay)
    ctx.cost(call, times(rows, math.prod(output.kernel.shape)), kv,
             positions, lay)
    # Scores (query . key) and the weighted sum of the values, per head.
    size = block.num_query_heads * query.kernel.shape[-1]
    ctx.cost(call, times(None if rows is None else rows * rows, 2 * size),
             kv, positions)
    ctx.width(call, "num_query_heads", heads)
    ctx.width(call, "num_key_value_heads", kv)


def _mlp(ctx, call, lay, rows):
    """The gated MLP's hidden units, a group of their own."""
    block = call.layer
    gate, up, down = (sub_layer(block, n) for n in (_GATE, _UP, _DOWN))
    for dense in (gate, up, down):
        why = (einsum_dense_spec(dense)
               if isinstance(dense, keras.layers.EinsumDense) else None)
        if why:
            raise ValueError(why)
    units = up.kernel.shape[-1]
    hidden = ctx.new_group(units, f"{call.name}/mlp")
    for dense, src, dst in ((gate, lay, hidden), (up, lay, hidden),
                            (down, hidden, lay)):
        ctx.consumer(call, dense.kernel, 0, src)
        ctx.member(call, dense.kernel, 1, dst, producer=dst is hidden)
        if dense.bias is not None:
            ctx.member(call, dense.bias, 0, dst)
        ctx.cost(call, times(rows, *dense.kernel.shape), src, dst)
    # Gemma's config counts gate and up units together.
    ctx.width(call, "intermediate_dim",
              ctx.rep(hidden, block.intermediate_dim // units))


class DecoderBlockHandler(StreamHandler):
    """A keras_hub decoder block: grouped-query heads and a gated MLP.

    Args:
        pruned: the block's `Pruned...` subclass, which `rebuild` returns.
    """

    replaces = True  # Llama's and Qwen3's configs do not load back

    def __init__(self, pruned: type):
        self.pruned = pruned

    def channels(self, ctx, call):
        x, lay = _stream(ctx, call)
        rows = known_prod(x.shape[1:-1])
        _attention(ctx, call, sub_layer(call.layer, _ATTENTION), lay, rows)
        _mlp(ctx, call, lay, rows)
        return [lay]

    def config(self, layer) -> dict:
        return {**arguments(layer), "head_dim": head_dim(layer),
                "norm_counts": getattr(layer, "norm_counts", None)}

    def backbone_widths(self, layer) -> dict[str, int]:
        """The block's widths by its backbone's config keys (`kc.llm`)."""
        return block_widths(layer)

    def rebuild(self, config, widths):
        config.update(self.take_counts(config, widths))
        return self.pruned.from_config(config)


def _pin_heads(attention, size: int) -> None:
    """Rebuilds an attention's projections at head size `size`.

    For the families that derive the head size (`hidden_dim //
    num_query_heads`) when they build: the projections are built anew at
    the given size, under the same names.
    """
    query = sub_layer(attention, _QUERY)
    if query.kernel.shape[-1] == size:
        return
    for names in (_QUERY, _KEY, _VALUE, _OUTPUT):
        name = _attr(attention, names)
        old = getattr(attention, name)
        config = old.get_config()
        model_axis, head_axis, _ = _axes(old, output=names is _OUTPUT)
        if names is _OUTPUT:
            shape = (None, None, old.kernel.shape[head_axis], size)
        else:
            config["output_shape"] = (*config["output_shape"][:-1], size)
            shape = (None, None, old.kernel.shape[model_axis])
        new = keras.layers.EinsumDense.from_config(config)
        with keras.name_scope(attention.name):  # its variables' paths
            new.build(shape)
        _swap(attention, name, new)
    attention._inv_norm_factor = 1.0 / math.sqrt(size)


def _weigh_norms(block, counts, shape) -> None:
    """Replaces `block`'s norms over the stream by `ClusterNormalization`s
    weighing each channel by `counts` (same names and scales), while
    `block` builds (in its name scope)."""
    for name in _NORMS:
        norm = getattr(block, name, None)
        if norm is not None:
            handler = handler_for(norm)
            weighed = handler.rebuild(handler.config(norm),
                                      {"counts": counts})
            weighed.build(shape)
            _swap(block, name, weighed)


def _swap(owner, name: str, new) -> None:
    """Sets `new` as `owner`'s sub-layer `name`, under the key of
    `owner`'s locked state."""
    tracker, locked = owner._tracker, owner._tracker.locked
    tracker.unlock()
    tracker.untrack(getattr(owner, name))
    setattr(owner, name, new)
    if locked:
        owner._lock_state()


def carry_stream(block, weights, factor: float = 1.0) -> None:
    """Lets `block` read and write the residual stream carried as
    `factor * weights * x` (per channel) instead of `x`.

    What it writes is scaled alike: its output and down projections'
    columns by `weights * factor`, or by `weights` where a norm follows
    them (Gemma's post-norms), whose gain is scaled by `factor` (a norm's
    output does not see its input's scale; an RMS norm over `weights * a`
    with `weights = sqrt(counts * n / sum(counts))` computes the
    `counts`-weighed one's statistics). The norms that read the stream
    divide their gains by `weights` (their statistics see the same
    weighing, and not `factor`, but through their epsilon).

    Args:
        block: a decoder block of one of the seven families, built.
        weights: one positive factor per stream channel.
        factor: one factor for all channels. Defaults to `1.0`.
    """
    weights = np.asarray(weights, "float32")
    attention = sub_layer(block, _ATTENTION)
    writers = {"attention": (sub_layer(attention, _OUTPUT), True),
               "mlp": (sub_layer(block, _DOWN), False)}
    for role, (dense, einsum) in writers.items():
        norm = getattr(block, _WRITE_NORMS[role], None)
        scale = weights if norm is not None else weights * factor
        axis = _axes(dense, output=True)[0] if einsum else 1
        _times_axis(dense.kernel, scale, axis)
        if dense.bias is not None:
            _times_axis(dense.bias, scale, -1)
        if norm is not None:
            times_gain(norm, factor)
    for name in _READ_NORMS:
        norm = getattr(block, name, None)
        if norm is not None:
            times_gain(norm, 1 / weights)


def _times_axis(variable, scale, axis: int) -> None:
    """Multiplies `variable` by `scale` along `axis`."""
    shape = [1] * len(variable.shape)
    shape[axis] = -1
    variable.assign(variable.numpy() * np.reshape(scale, shape))


def times_gain(norm, scale) -> None:
    """Multiplies a registered RMS norm's gain (`offset + scale`, Gemma's
    offset 1) by `scale`."""
    handler = handler_for(norm)
    variable = getattr(norm, handler.scale)
    gain = (handler.offset + variable.numpy()) * scale
    variable.assign(gain - handler.offset)


def _pruned_class(base: type) -> type:
    """The serializable subclass of a decoder block with `head_dim`."""
    native = "head_dim" in inspect.signature(base.__init__).parameters

    def __init__(self, *args, head_dim=None, norm_counts=None, **kwargs):
        if native:
            kwargs["head_dim"] = head_dim
        base.__init__(self, *args, **kwargs)
        self.head_dim = head_dim
        self.norm_counts = norm_counts

    def build(self, input_shape):
        base.build(self, input_shape)
        if self.head_dim and not native:
            _pin_heads(sub_layer(self, _ATTENTION), self.head_dim)
        if self.norm_counts is not None:
            _weigh_norms(self, self.norm_counts, input_shape)

    def get_config(self):
        return {**arguments(self, base), "head_dim": self.head_dim,
                "norm_counts": self.norm_counts}

    name = "Pruned" + base.__name__
    cls = type(name, (base,), {
        "__init__": __init__, "build": build, "get_config": get_config,
        "__module__": __name__,
        "__doc__": (
            f"keras_hub's `{base.__name__}` with its head size in its "
            "config (`head_dim`), as `kc.slim` builds it narrower.\n\n"
            "Args:\n    *args: the base block's arguments.\n"
            "    head_dim: the size of each attention head. Defaults to "
            "`None` (the base block's own).\n"
            "    norm_counts: how many channels each stream channel stands "
            "for in its norms' statistics (`ClusterNormalization`), or "
            "`None` (one each). Defaults to `None`.\n"
            "    **kwargs: the base block's other arguments.\n"
        ),
    })
    return keras.saving.register_keras_serializable(
        package="keras_csgd")(cls)


def _register() -> dict[str, type]:
    """Registers every keras_hub decoder block; `{name: pruned class}`."""
    from keras_hub.src.models.gemma.gemma_decoder_block import (
        GemmaDecoderBlock,
    )
    from keras_hub.src.models.gemma3.gemma3_decoder_block import (
        Gemma3DecoderBlock,
    )
    from keras_hub.src.models.llama.llama_decoder import (
        LlamaTransformerDecoder,
    )
    from keras_hub.src.models.mistral.mistral_transformer_decoder import (
        MistralTransformerDecoder,
    )
    from keras_hub.src.models.phi3.phi3_decoder import Phi3Decoder
    from keras_hub.src.models.qwen.qwen_decoder import QwenTransformerDecoder
    from keras_hub.src.models.qwen3.qwen3_decoder import (
        Qwen3TransformerDecoder,
    )

    out = {}
    for base in (LlamaTransformerDecoder, MistralTransformerDecoder,
                 QwenTransformerDecoder, Qwen3TransformerDecoder,
                 Phi3Decoder, GemmaDecoderBlock, Gemma3DecoderBlock):
        pruned = _pruned_class(base)
        register_layer(base, DecoderBlockHandler(pruned))
        out[pruned.__name__] = pruned
    return out


PRUNED = _register()
globals().update(PRUNED)
