"""Model shapes, one registry: `shapes.py` (the architecture knobs as data, and the logical matrices Muon
orthogonalizes) and `registry.py` (the paper's named models, the 4B, the CPU configs, the benchmarks' shapes).
Pure data: nothing here imports Megatron."""
