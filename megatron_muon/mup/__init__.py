"""muP tools on a megatron-core GPT: `python -m megatron_muon.mup coord-check` (see coord_check.py)."""
