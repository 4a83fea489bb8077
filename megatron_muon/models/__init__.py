"""Model shapes, one registry: `shapes.py` (the architecture knobs as data) and `registry.py` (the paper's named
models, the 4B, the CPU configs). Pure data: nothing here imports Megatron."""
