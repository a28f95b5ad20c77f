"""`keras.ops` calls: channel rules for the operations of a functional graph.

A `keras.ops` call on Keras tensors (`ops.split(x, 2, axis=-1)`, `x * 0.5`,
`x[:, 0]`, `ops.mean(x, axis=(1, 2))`) is a node of the graph, like a layer
call: in a functional model and in a traced composite layer. Each
operation class has a handler here, as layers do. Channels are followed on
every axis (`graph.Axes`), not only the last: an attention reshapes its
projections to heads and head size and moves the heads to their own axis.

- element-wise operations of one tensor pass every axis through;
- element-wise operations of several tensors (`+`, `*`, `where`, ...) are
  merges, axis by axis (`structure.merge_axes`): full-size tensors share
  one channel space; a constant with more than one entry on an axis of
  channels (a per-channel array) freezes it;
- reductions, indexing, padding, squeezes, new axes, rolls, tiles and
  resizes pass the axes they leave alone, and freeze channels they reduce,
  index, pad or roll;
- transposes permute the axes; a reshape regroups them (`Spaces.reshape`:
  an axis of channels cut into several is a product of factors of its
  group, and axes merged into one make the product of their layouts), and
  is rebuilt with the new sizes;
- `matmul` and `einsum`: an axis in both operands and the output (batch)
  or in one operand and the output (free) keeps its layout, and one
  contracted between the operands joins their groups; such a group is
  prune-only (its channels may be removed from both operands, but merging
  two would add their products, which a slim model does not compute).
  Softmax passes every axis but the one it normalises over;
  `dot_product_attention` is the two contractions it computes, with heads
  as one group;
- concatenation on the last axis lays layouts end to end, and splitting it
  splits the channel group into parts (an index map), rebuilt with the new
  part sizes;
- selections by value (`top_k`, `sort`, `argmax`) freeze the channels they
  see and cost nothing; anything else (unregistered operations, `map` of a
  Python function) freezes the channels it touches, with a reason, and its
  MACs are not counted (`count_macs` says so).

Modules, by concern: `elementwise` (functions of one tensor, merges of
several), `reduction` (reductions, softmax, selections by value), `shape`
(transposes, new and squeezed axes, rolls, tiles, broadcasts, padding,
resizes, reshapes), `indexing` (concatenation, stacks, splits, gathers,
`x[key]`), `contraction` (`matmul`, `einsum`, `dot_product_attention`);
`common` holds the helpers they share. Importing this package registers
them all.
"""

from keras_csgd.layers.ops import (
    contraction,
    elementwise,
    indexing,
    reduction,
    shape,
)
