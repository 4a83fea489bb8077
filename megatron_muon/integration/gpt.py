"""megatron-core GPTModels built from a model shape (`models/shapes.py`), with the local layer spec (no
Transformer Engine needed) or TE's."""

from __future__ import annotations

import torch

from megatron_muon.models.shapes import GPTShape, architecture_kwargs


def transformer_config(shape: GPTShape, dtype: torch.dtype = torch.float32, **overrides):
    """A TransformerConfig for the current parallel state; CUDA-only fusions are off so CPU and GPU agree."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(
        **architecture_kwargs(shape),
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Build every weight on CPU from the global seed, then shard: TP=1 and TP=2 start from the same model.
        use_cpu_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
    )
    if shape.num_experts:
        kwargs.update(
            num_moe_experts=shape.num_experts,
            moe_router_topk=2,
            expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
            # The all-gather dispatcher is the one that runs without CUDA events.
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
        )
    kwargs.update(overrides)
    config = TransformerConfig(**kwargs)
    if config.use_mup and "mup_output_mult" in overrides:
        # Megatron reads mup_output_mult == 1.0 as unset and replaces it by 1 / mup_width_mult; a muP setup whose
        # tuned output multiplier cancels the preset's asks for logits x1 exactly.
        config.mup_output_mult = overrides["mup_output_mult"]
    return config


def layer_spec(shape: GPTShape, spec: str = "local"):
    """megatron-core's layer spec for `shape`: "local" (pure PyTorch) or "transformer_engine" (TE modules)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if spec == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=shape.num_experts, qk_layernorm=shape.qk_layernorm
        )
    if spec != "local":
        raise ValueError(f"layer spec must be 'local' or 'transformer_engine', got {spec!r}")
    return gpt_layer_specs.get_gpt_layer_local_spec(
        num_experts=shape.num_experts, normalization="RMSNorm", qk_layernorm=shape.qk_layernorm
    )


def build_gpt(shape: GPTShape, dtype: torch.dtype = torch.float32, spec: str = "local", **config_overrides):
    """This pipeline stage's GPTModel for `shape` under the current parallel state (`spec`: see layer_spec)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_model import GPTModel

    config = transformer_config(shape, dtype, **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(shape, spec),
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=shape.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=shape.rotary_base,
    )
    return model.to(dtype)
