"""The paper's models as named configs: one shape per name, from which the Megatron TransformerConfig, the
megatron.training flags and the parameter count all follow, so the training entry, the launch scripts and
the tests cannot disagree about what "3.67b" is.

The architecture is the paper's Gemma-3-style decoder (arXiv 2505.02222, Sec. 2 and 3.4): pre-norm RMSNorm,
QK-norm, RoPE, global attention only, GQA with half as many KV heads as query heads, head dimension 128,
a gated three-matrix MLP, no biases, tied input and output embeddings, sequence length 8192, Llama-3's
128,256-token vocabulary.

Choices the paper leaves open, made here explicitly:

* activation: SwiGLU (`--swiglu`). Gemma uses GeGLU, but megatron.training has no flag for it (only
  `--quick-geglu`, a different approximation); both gated MLPs have the same three matrices and parameters.
* RMSNorm epsilon 1e-6 (Gemma's); RoPE base 1,000,000 (Gemma 3's global-attention layers).
* Gemma's extra post-attention and post-MLP norms are left out: megatron-core's GPT layer has pre-norms only
  (2 x d_model parameters per layer, 0.005% of the 3.67B model).
* the "4b" model of Sec. 2: its shape is not given. It takes the width family's top width (d_model 2560,
  20 / 10 heads, d_mlp 10240: also Gemma 3 4B's width, MLP and depth) with 36 layers instead of 34, which
  puts it at 3.87B, Gemma 3 4B's 3.88B text-model size; 36 layers also split evenly over 2, 3, 4 or 6
  pipeline stages.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

from megatron_muon.models.shapes import GPTShape, architecture_kwargs, matrix_shapes

PAPER_VOCAB_SIZE = 128_256  # Llama 3's tokenizer, the paper's
PAPER_SEQ_LENGTH = 8192
PAPER_HEAD_DIM = 128
PAPER_NUM_LAYERS = 34  # the muP width family's fixed depth
GEMMA_NORM_EPSILON = 1e-6
GEMMA3_GLOBAL_ROPE_BASE = 1_000_000
CPU_VOCAB_SIZE = 4096


@dataclass(frozen=True)
class ModelConfig:
    """A named model: its shape, and the size the paper prints for it (billions) where it prints one."""

    name: str
    shape: GPTShape
    paper_billions: float | None = None

    def parameter_count(self, vocab_size: int | None = None) -> int:
        """Trainable parameters (embeddings included), for this vocabulary or the config's own."""
        return parameter_count(self.shape if vocab_size is None else replace(self.shape, vocab_size=vocab_size))

    def transformer_config_kwargs(self) -> dict:
        """megatron-core TransformerConfig fields of this model; add parallel sizes and dtypes to build one (or
        use megatron_muon.integration.gpt.transformer_config(config.shape) under an initialized parallel state)."""
        return architecture_kwargs(self.shape)

    def megatron_flags(self, transformer_impl: str | None = None) -> list[str]:
        """megatron.training's flags for exactly this model (without tokenizer, data or parallel sizes)."""
        s = self.shape
        if s.num_experts:
            raise ValueError(f"{self.name}: MoE shapes have no named-config flags")
        flags = [
            "--num-layers", str(s.num_layers),
            "--hidden-size", str(s.hidden_size),
            "--ffn-hidden-size", str(s.ffn_hidden_size),
            "--num-attention-heads", str(s.num_attention_heads),
            "--group-query-attention",
            "--num-query-groups", str(s.num_query_groups),
            "--kv-channels", str(s.head_dim),
            "--normalization", "RMSNorm",
            "--norm-epsilon", repr(s.norm_epsilon),
            "--disable-bias-linear",
            "--position-embedding-type", "rope",
            "--rotary-base", str(s.rotary_base),
            "--seq-length", str(s.seq_length),
            "--max-position-embeddings", str(s.seq_length),
            "--attention-dropout", repr(s.dropout),
            "--hidden-dropout", repr(s.dropout),
            "--transformer-impl", transformer_impl or default_transformer_impl(),
        ]
        if s.gated_linear_unit:
            flags.append("--swiglu")
        if s.qk_layernorm:
            flags.append("--qk-layernorm")
        if not s.tie_embeddings:
            flags.append("--untie-embeddings-and-output-weights")
        return flags


def parameter_count(shape: GPTShape) -> int:
    """What `sum(p.numel())` gives for megatron-core's GPTModel of this shape built as one stage (a tied
    output layer counted once): the Muon matrices, two norms per layer (plus QK-norm), the final norm and the
    embeddings. RoPE has no parameters; biases are off in every shape here."""
    matrices = sum(m.rows * m.cols * m.count for m in matrix_shapes(shape))
    norms = 2 * shape.hidden_size + (2 * shape.head_dim if shape.qk_layernorm else 0)
    embeddings = shape.vocab_size * shape.hidden_size * (1 if shape.tie_embeddings else 2)
    return matrices + shape.num_layers * norms + shape.hidden_size + embeddings


def paper_shape(hidden_size: int, num_layers: int = PAPER_NUM_LAYERS, head_dim: int = PAPER_HEAD_DIM,
                **overrides) -> GPTShape:
    """The paper's family at any width: d_model / head_dim query heads, half as many KV heads, d_mlp = 4 d_model."""
    heads, remainder = divmod(hidden_size, head_dim)
    if remainder or heads % 2:
        raise ValueError(f"hidden_size {hidden_size} must be an even multiple of the head dimension {head_dim}")
    fields = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=heads,
        num_query_groups=heads // 2,
        kv_channels=head_dim,
        ffn_hidden_size=4 * hidden_size,
        vocab_size=PAPER_VOCAB_SIZE,
        seq_length=PAPER_SEQ_LENGTH,
        qk_layernorm=True,
        norm_epsilon=GEMMA_NORM_EPSILON,
        rotary_base=GEMMA3_GLOBAL_ROPE_BASE,
    )
    fields.update(overrides)
    return GPTShape(**fields)


def cpu_shape(hidden_size: int, num_layers: int, seq_length: int) -> GPTShape:
    """The same architecture scaled down to run on CPU: 32-dim heads, short sequences, and the vocabulary of
    the embedded corpus's default tokenizer (megatron_muon.data.corpus.DEFAULT_VOCAB_SIZE)."""
    return paper_shape(hidden_size, num_layers, head_dim=32, seq_length=seq_length, vocab_size=CPU_VOCAB_SIZE)


def _registry() -> dict[str, ModelConfig]:
    # Sec. 3.4's muP width family; names are the sizes the paper prints.
    family = [(256, 0.07), (512, 0.20), (1024, 0.67), (2048, 2.40), (2560, 3.67)]
    configs = [ModelConfig(f"{size:.2f}b", paper_shape(width), size) for width, size in family]
    configs += [
        ModelConfig("4b", paper_shape(2560, num_layers=36)),
        ModelConfig("cpu-tiny", cpu_shape(hidden_size=64, num_layers=2, seq_length=128)),
        ModelConfig("cpu-small", cpu_shape(hidden_size=128, num_layers=4, seq_length=256)),
    ]
    return {config.name: config for config in configs}


MODEL_CONFIGS: dict[str, ModelConfig] = _registry()
MUP_WIDTH_FAMILY: tuple[str, ...] = ("0.07b", "0.20b", "0.67b", "2.40b", "3.67b")

# Shapes the CPU benchmarks measure, named so that a result file's model is one this registry rebuilds. Not
# training configs: megatron-core's defaults (no QK-norm, head dim d / heads), no vocabulary of a real tokenizer.
BENCHMARK_SHAPES: dict[str, GPTShape] = {
    # benchmarks/distributed_step.py on 4 gloo ranks: 2 layers like TINY, but 4 KV heads (TINY has 2) so that
    # TP=4 splits every head group.
    "distributed-step": GPTShape(num_layers=2, hidden_size=128, num_attention_heads=8, num_query_groups=4,
                                 ffn_hidden_size=256),
}


def get_model_config(name: str) -> ModelConfig:
    try:
        return MODEL_CONFIGS[name]
    except KeyError:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(MODEL_CONFIGS)}") from None


def default_transformer_impl() -> str:
    """Transformer Engine's layer spec where TE is installed, megatron-core's local one otherwise."""
    return "transformer_engine" if importlib.util.find_spec("transformer_engine") is not None else "local"
