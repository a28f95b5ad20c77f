"""Channel-group analysis of a functional Keras model.

The model's own node structure is read, and that of the composite layers
it calls, traced on Keras tensors (`trace`): every tensor gets a *layout*
(`layout`), the structure of its channel axis in terms of channel groups
(`spaces`: merged and split). Each layer or `keras.ops` call is handed to
its handler in the layer registry (`keras_csgd.layers`), which declares
through a `Context` how the call's variables read, produce or carry
channels (`analysis` runs it, `context` holds it, `records` what it
finds). `nodes` holds the
queries on the node graph, the only code that reads Keras's private node
structure.
"""

from keras_csgd.graph.analysis import analyze, channel_groups
from keras_csgd.graph.context import Context
from keras_csgd.graph.layout import (
    Axes,
    Reindex,
    flat_channels,
    group_maps,
    layout_size,
    leaves,
    map_leaves,
)
from keras_csgd.graph.nodes import (
    NODE_LISTS,
    ancestors,
    call_arguments,
    call_inputs,
    channels,
    check_functional,
    following_batchnorm,
    input_like,
    is_graph_model,
    operations_between,
    producer_name,
    producer_of,
    read_only_by,
    sole_reader,
    static_inputs,
    successors,
    topological_nodes,
)
from keras_csgd.graph.records import Analysis, Call, Cost, Entry
from keras_csgd.graph.variables import (
    get_variable,
    group_rows,
    producer_filters,
    short_name,
)

__all__ = [
    "NODE_LISTS", "Analysis", "Axes", "Call", "Context", "Cost", "Entry",
    "Reindex",
    "analyze",
    "ancestors", "call_arguments", "call_inputs", "channel_groups",
    "channels", "check_functional", "flat_channels", "following_batchnorm",
    "get_variable", "group_maps", "group_rows", "input_like",
    "is_graph_model",
    "layout_size", "leaves",
    "map_leaves", "operations_between", "producer_filters", "producer_name",
    "producer_of", "read_only_by", "short_name", "sole_reader",
    "static_inputs", "successors", "topological_nodes",
]
