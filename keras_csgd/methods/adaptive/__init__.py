"""Adaptive channel and layer pruning: learnt gates under a MACs or latency
budget.

"Cut off the channel and the layer adaptively; the proportion of each is
learned." `AdaptiveGates` inserts learnable gates into a copy of a trained
model: a per-channel gate (`ChannelGate`) on every prunable channel group and
a scalar gate (`BlockGate`) on the branch of every residual block. A
sparsity penalty on the gates (Hoyer-square per channel group, L1 per
block), each weighted by the cost it controls (MACs, or the milliseconds of
a latency table), pulls them to zero; a callback
(`kc.callbacks.MacsTargetCallback`) raises the penalty weight while the
estimated cost of the pruned model is above the target and, once it reaches
it, locks the smallest gates at exactly 0 and stops the penalty, so that the
rest of training fine-tunes the pruned network. `finalize` folds the gates
into a copy of the trained weights and returns it with a plan: the channels
whose gates are locked (or fell lowest) and, in `plan.remove_blocks`, the
residual blocks whose branch gate closed, which `kc.slim` removes (the Add
is replaced by its shortcut: layer removal).

Modules: `gates` (the gate layers), `sites` (where gates go and how they
fold back), `budget` (cost models and targets), `controller`
(`AdaptiveGates`).

References:
    Adaptive channel and layer pruning (seed abstract: "the proportion of
    each is learned"); the gates follow network slimming (Liu et al.,
    ICCV 2017, arXiv 1708.06519) and its budgeted variants; the channel
    penalty is DeepHoyer's Hoyer-square (Yang et al., ICLR 2020,
    arXiv 1908.09979).
"""

from keras_csgd.callbacks.macs_target import MacsTargetCallback
from keras_csgd.methods.adaptive.controller import AdaptiveGates
from keras_csgd.methods.adaptive.gates import BlockGate, ChannelGate

__all__ = ["AdaptiveGates", "BlockGate", "ChannelGate", "MacsTargetCallback"]
