"""The one package that imports megatron: model builders, parallel-state lifecycle, CPU shims, and (later) the
optimizer integration. Every touch point of Megatron internals names the megatron-core version it was written
against (0.19.2)."""
