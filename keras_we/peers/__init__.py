"""The existing weight-reactivation methods Weight Evolution is compared
with, as Keras callbacks beside `keras_we.WeightEvolution`.

- `NoiseGrafting`, `InternalGrafting`: the single-network variants of
  filter grafting (Meng et al., CVPR 2020).
- `fit_grafted`: external filter grafting, K networks trained side by side
  (with `entropy` and `grafting_coefficient`, its two formulas).
- `RePr`: prune the most redundant filters for a while, then re-initialize
  them orthogonally (Prakash et al., CVPR 2019).
- `DSD`: dense - sparse - dense training (Han et al., ICLR 2017).

What each computes is pinned in the docstrings (after the repository's
PEERS.md); they touch the same kernels as Weight Evolution
(`keras_we.peers.kernels`).
"""

from keras_we.peers.dsd import DSD
from keras_we.peers.grafting import entropy, fit_grafted, graft, grafting_coefficient
from keras_we.peers.internal_grafting import InternalGrafting
from keras_we.peers.noise_grafting import NoiseGrafting
from keras_we.peers.repr import RePr

__all__ = [
    "DSD",
    "InternalGrafting",
    "NoiseGrafting",
    "RePr",
    "entropy",
    "fit_grafted",
    "graft",
    "grafting_coefficient",
]
