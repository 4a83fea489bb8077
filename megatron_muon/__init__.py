"""megatron-muon: Muon, muP and muP hyperparameter transfer for Megatron-LM large-batch pretraining.

Floors (imports only go down): math (newton_schulz, muon, plan) -> runtime (testing.ranks) -> Megatron
integration (megatron/) -> tools (examples/, benchmarks/). Importing this package never imports megatron.
"""

from megatron_muon.muon import Muon, MuonWithAdamW, split_params
from megatron_muon.newton_schulz import orthogonalize, polar_error

__all__ = ["Muon", "MuonWithAdamW", "orthogonalize", "polar_error", "split_params"]
