"""Pruning with compensation (CaP): least-squares repair of the consumers.

When input channels of a consumer layer (a convolution or dense layer) are
removed, the consumer's own weights can absorb most of the loss: from a
little data, collect the mean `mu` and covariance `Sigma` of the consumer's
input *patch vectors* (the `kh * kw * in` entries one output position reads,
in the kernel's `(kh, kw, in)` order), and replace the weights `W` (rows =
output channels) by the closed-form least-squares fit on the kept entries
`s`:

```
W_new = W Sigma[:, s] Sigma[s, s]^-1
b_new = b + W mu - W_new mu[s]
```

`cap_rank` orders the channels greedily by how much of the consumer's output
they explain after compensation, and `structural_search` picks each group's
sparsity by a binary search under a linearly falling accuracy floor.

Typical use:

```python
stats = compensation.collect_statistics(model, x_calib)
slim = compensation.compensate(model, plan, stats)
plan, slim = compensation.structural_search(
    model, x_calib, evaluate, acc_start=0.92, acc_end=0.90
)
```

Modules: `statistics` (patch vectors and their moments), `solve` (the
least-squares refit and the compensation-aware ranking), `refit`
(`compensate`: slim a model and refit its consumers), `search`
(`structural_search`).

References:
    Xie et al., "Pruning with Compensation: Efficient Channel Pruning for
    Deep Convolutional Neural Networks", arXiv 2108.13728.
"""

from keras_csgd.methods.compensation.refit import compensate
from keras_csgd.methods.compensation.search import structural_search
from keras_csgd.methods.compensation.solve import cap_rank
from keras_csgd.methods.compensation.statistics import (
    Stats,
    collect_statistics,
)

__all__ = [
    "Stats", "cap_rank", "collect_statistics", "compensate",
    "structural_search",
]
