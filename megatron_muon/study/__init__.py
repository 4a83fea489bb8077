"""Studies of the paper's Sec. 2 built on the sweep machinery: `python -m megatron_muon.study batch` (see batch.py)."""
