"""The one package that imports megatron: the plugin's hooks (install.py, checked first by compat.py, the list of
every Megatron symbol touched), its flags (flags.py), the optimizer inside Megatron's wrappers (optimizer.py,
checkpoint.py, layouts.py), muP on Megatron's GPT (mup.py), Megatron's data formats (datasets.py), and what runs
Megatron on CPU and in the tools: gpt.py, parallel_state.py, cpu_shims.py, training.py (the one training loop).
Written against megatron-core 0.19.2 (compat.WRITTEN_AGAINST)."""
