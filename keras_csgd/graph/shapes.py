"""Static shapes where Keras's symbolic calls lose them.

Two Keras behaviours leave a dynamic dimension in a graph whose sizes are
all known, and a dynamic dimension makes `count_macs` raise:

- A composite layer traced on `keras.Input`s (`trace`) reads the batch
  size as `None` (`ops.shape(x)[0]`) and reshapes to `(None, ..., c)`:
  such a graph does not run, and a `-1` next to it makes the rest
  dynamic. `batch_sizes_inferred` makes `ops.shape` read a `BatchDim`
  instead, a number that only multiplies and divides (`batch // windows`,
  Swin's window partition), and makes the reshapes it reaches infer the
  batch size; a tile or broadcast to it (`ops.tile(token, (batch, 1,
  1))`) becomes a `BatchTile` of the tensor it was read from.
- `EinsumDense` given a partial output shape with `None` for an axis it
  shares with its input (keras_hub's `"btd,df->btf"` with `(None, f)`)
  reports that axis as `None` whatever the input's size.
  `einsum_shapes_resolved` gives it the input's size.

Both patch a Keras class for the duration of a `with` block and restore it.
"""

from __future__ import annotations

import contextlib
import math
import re
from fractions import Fraction

import keras
from keras.src import ops as src_ops
from keras.src.ops import core as src_core
from keras.src.ops import numpy as src_numpy
from keras.src.ops.numpy import Reshape
from keras.src.saving.serialization_lib import SerializableDict

from keras_csgd.graph import nodes
from keras_csgd.layers.traced import BatchTile


class BatchDim:
    """The batch size of `tensor` (times `multiple`), as a traced call
    reads it: it multiplies and floor-divides by numbers, nothing else.

    Args:
        tensor: the Keras tensor whose first axis it is.
        multiple: a `Fraction`. Defaults to 1.
    """

    def __init__(self, tensor, multiple=Fraction(1)):
        self.tensor = tensor
        self.multiple = multiple

    def __mul__(self, k):
        if isinstance(k, int):
            return BatchDim(self.tensor, self.multiple * k)
        return NotImplemented

    __rmul__ = __mul__

    def __floordiv__(self, k):
        if isinstance(k, int) and k:
            return BatchDim(self.tensor, self.multiple / k)
        return NotImplemented

    def __repr__(self):
        return f"BatchDim({self.multiple})"


def _shape(plain):
    def shape(x):
        out = plain(x)
        if isinstance(x, keras.KerasTensor) and out and out[0] is None:
            return (BatchDim(x), *out[1:])
        return out

    return shape


def _batch_tile(plain, mode: str):
    def batched(x, sizes):
        sizes = sizes if isinstance(sizes, (list, tuple)) else [sizes]
        if not sizes or not isinstance(sizes[0], BatchDim):
            return plain(x, sizes)
        dim = sizes[0]
        m = dim.multiple
        layer = BatchTile([1, *sizes[1:]], (m.numerator, m.denominator),
                          mode)
        return layer(x, dim.tensor)

    return batched


_PATCHES = {  # function name -> its patch, in every module that has it
    "shape": _shape,
    "tile": lambda plain: _batch_tile(plain, "tile"),
    "broadcast_to": lambda plain: _batch_tile(plain, "broadcast"),
}


def _modules():
    return [keras.ops, getattr(keras.ops, "numpy", None),
            getattr(keras.ops, "core", None), src_ops, src_numpy, src_core]


@contextlib.contextmanager
def batch_sizes_inferred():
    """`ops.shape` reads the batch size as a `BatchDim` meanwhile, and
    reshapes to it (`(batch, -1, c)`, or `(None, -1, c)`) infer it instead
    (`(-1, n, c)`), when the other sizes are static: a `-1` among them is
    the tensor's entries per batch entry (`_per_batch`) over theirs. Tiles
    and broadcasts to it are `BatchTile`s.

    Done as each reshape is called, so that the shapes downstream are the
    static ones the layer computes with (a later layer's MACs read them),
    and recorded in the arguments `get_config` returns (`slim` rebuilds a
    narrowed reshape from its config).
    """
    plain = Reshape.symbolic_call

    def symbolic_call(op, *args, **kwargs):
        x, shape = (args or [kwargs.get("x")])[0], op.newshape
        first = shape[0] if isinstance(shape, tuple) and shape else 0
        if (first is None or isinstance(first, BatchDim)) and isinstance(
                x, keras.KerasTensor):
            newshape = _batch_inferred(x, shape)
            if newshape is not None:
                op.newshape = newshape
                # Its config (read by `slim`) holds the inferred shape.
                op._auto_config = SerializableDict(newshape=newshape)
            elif isinstance(first, BatchDim):
                raise TypeError(f"a reshape to the batch size, {shape}, "
                                "with another unknown size")
        elif isinstance(shape, tuple) and -1 not in shape and sum(
                isinstance(d, BatchDim) for d in shape) == 1 and all(
                isinstance(d, (int, BatchDim)) for d in shape):
            # The batch folded into another axis (`(3, batch * heads, n,
            # d)`): that axis is the one Keras leaves unknown.
            op.newshape = tuple(
                -1 if isinstance(d, BatchDim) else d for d in shape)
            op._auto_config = SerializableDict(newshape=op.newshape)
        return plain(op, *args, **kwargs)

    saved = [(m, name, getattr(m, name)) for m in _modules() if m
             for name in _PATCHES if hasattr(m, name)]
    Reshape.symbolic_call = symbolic_call
    for module, name, fn in saved:
        setattr(module, name, _PATCHES[name](fn))
    try:
        yield
    finally:
        Reshape.symbolic_call = plain
        for module, name, fn in saved:
            setattr(module, name, fn)


def _batch_inferred(x, shape) -> tuple | None:
    """`shape` (its first size the batch's, `None` or a `BatchDim`) with
    `-1` there and every other size static, or `None` if it cannot be."""
    rest = shape[1:]
    if None in rest or any(isinstance(d, BatchDim) for d in rest):
        return None
    if -1 not in rest:
        return (-1, *rest)
    n, m = _per_batch(x), _rows(shape[0])
    if n is None or m is None:
        return None
    fill = n / (m * math.prod(d for d in rest if d != -1))
    if fill != int(fill):
        return None
    return (-1, *(int(fill) if d == -1 else d for d in rest))


def _rows(dim) -> Fraction | None:
    """The rows a batch size `dim` (`None` or a `BatchDim`) stands for per
    entry of the model's batch: a `BatchDim` read from a tensor of windows
    (Swin's, ViTDet's `batch // windows`) counts the windows too."""
    if not isinstance(dim, BatchDim):
        return Fraction(1)
    n = _per_batch(dim.tensor)
    if n is None:
        return None
    return dim.multiple * n / math.prod(tuple(dim.tensor.shape)[1:])


def _per_batch(x) -> Fraction | None:
    """The entries of Keras tensor `x` per entry of the batch, from the
    graph that computed it: a reshape keeps the count; another operation
    carries its one dynamic axis (its static sizes give the rest)."""
    shape = tuple(x.shape)
    op, inputs = nodes.producing_call(x)
    if op is None:
        if shape and shape[0] is None and None not in shape[1:]:
            return Fraction(math.prod(shape[1:]))
        return None
    if isinstance(op, BatchTile):
        return Fraction(*op.multiple) * math.prod(shape[1:])
    src = next((t for t in inputs if None in tuple(t.shape)), None)
    n = None if src is None else _per_batch(src)
    if n is None or isinstance(op, Reshape):
        return n
    if shape.count(None) != 1 or tuple(src.shape).count(None) != 1:
        return None
    return n * math.prod(d for d in shape if d is not None) / math.prod(
        d for d in src.shape if d is not None)


_EQUATION = re.compile(r"([a-zA-Z]+),[a-zA-Z]+->([a-zA-Z]+)$")


@contextlib.contextmanager
def einsum_shapes_resolved():
    """`EinsumDense` layers called meanwhile report the input's size for
    an output axis they share with it, where their output shape says
    `None`."""
    cls = keras.layers.EinsumDense
    plain = cls.compute_output_shape

    def compute_output_shape(layer, input_shape):
        shape = list(plain(layer, input_shape))
        match = _EQUATION.match(layer.equation.replace(" ", ""))
        if match and len(match.group(1)) == len(input_shape) and len(
                match.group(2)) == len(shape):
            given, made = match.groups()
            for i, axis in enumerate(made):
                if shape[i] is None and axis in given:
                    shape[i] = input_shape[given.index(axis)]
        return tuple(shape)

    cls.compute_output_shape = compute_output_shape
    try:
        yield
    finally:
        cls.compute_output_shape = plain
