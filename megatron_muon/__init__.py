"""megatron-muon: Muon, muP and muP hyperparameter transfer for Megatron-LM large-batch pretraining.

Floors (imports only go down): math (newton_schulz, muon_config, muon, plan) -> runtime (testing.ranks) -> Megatron
integration (megatron/) -> tools (examples/, benchmarks/). Importing this package never imports megatron.
"""

from megatron_muon.muon import Muon, MuonWithAdamW, split_params
from megatron_muon.muon_config import MuonConfig
from megatron_muon.newton_schulz import orthogonalize, polar_error


def install() -> None:
    """Make megatron-core's get_megatron_optimizer build this plugin's Muon for optimizer="muon" (see
    megatron_muon/integration/install.py). Imports megatron, so it is a function, not an import side effect."""
    from megatron_muon.integration.install import install as _install

    _install()


__all__ = ["Muon", "MuonConfig", "MuonWithAdamW", "install", "orthogonalize", "polar_error", "split_params"]
