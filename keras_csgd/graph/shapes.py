"""Static shapes where Keras's symbolic calls lose them.

Two Keras behaviours leave a dynamic dimension in a graph whose sizes are
all known, and a dynamic dimension makes `count_macs` raise:

- A composite layer traced on `keras.Input`s (`trace`) reads the batch
  size as `None` (`ops.shape(x)[0]`) and reshapes to `(None, ..., c)`:
  such a graph does not run, and a `-1` next to it makes the rest
  dynamic. `batch_sizes_inferred` makes those reshapes infer the batch
  size instead.
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

import keras
from keras.src.ops.numpy import Reshape


@contextlib.contextmanager
def batch_sizes_inferred():
    """Reshapes made meanwhile to the batch size read while tracing
    (`(batch, -1, c)`, read as `(None, -1, c)`) infer it instead
    (`(-1, n, c)`), when the other sizes are static.

    Done as each reshape is called, so that the shapes downstream are the
    static ones the layer computes with (a later layer's MACs read them),
    and recorded in the arguments `get_config` returns (`slim` rebuilds a
    narrowed reshape from its config).
    """
    plain = Reshape.symbolic_call

    def symbolic_call(op, *args, **kwargs):
        x, shape = (args or [kwargs.get("x")])[0], op.newshape
        if (isinstance(shape, tuple) and shape and shape[0] is None
                and isinstance(x, keras.KerasTensor)):
            rest, src = shape[1:], x.shape[1:]
            if None not in rest and None not in src:
                known = math.prod(d for d in rest if d != -1)
                op.newshape = (-1, *(math.prod(src) // known if d == -1
                                     else d for d in rest))
                made = getattr(op, "_auto_config", None)
                if made is not None and "newshape" in made.config:
                    made.config["newshape"] = op.newshape
        return plain(op, *args, **kwargs)

    Reshape.symbolic_call = symbolic_call
    try:
        yield
    finally:
        Reshape.symbolic_call = plain


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
