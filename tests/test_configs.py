"""Named model configs: sizes against the paper, the analytic count and the logical Muon matrices against
megatron-core's own GPTModel, and the megatron.training flags against the shape they were generated from."""

import collections
import dataclasses
import os
import sys

import pytest

from megatron_muon.models.registry import (
    BENCHMARK_SHAPES,
    MODEL_CONFIGS,
    MUP_WIDTH_FAMILY,
    PAPER_VOCAB_SIZE,
    get_model_config,
    paper_shape,
    parameter_count,
)
from megatron_muon.models.shapes import TINY, architecture_kwargs, logical_matrices, matrix_shapes
from megatron_muon.testing.ranks import run_ranks

# Sec. 3.4 prints each size to two decimals; the analytic count must round to it. Exact counts recorded here
# so a change of architecture (a norm, a bias, the vocabulary) shows up even when the rounding would hide it.
PAPER_FAMILY = {
    "0.07b": (0.07, 66_283_264),
    "0.20b": (0.20, 199_404_544),
    "0.67b": (0.67, 666_187_264),
    "2.40b": (2.40, 2_401_913_344),
    "3.67b": (3.67, 3_670_856_704),
}


@pytest.mark.parametrize("name", MUP_WIDTH_FAMILY)
def test_width_family_matches_the_paper_sizes(name):
    config = get_model_config(name)
    paper_billions, exact = PAPER_FAMILY[name]
    assert config.paper_billions == paper_billions
    assert config.shape.num_layers == 34 and config.shape.head_dim == 128
    assert config.shape.num_query_groups * 2 == config.shape.num_attention_heads
    assert config.shape.vocab_size == PAPER_VOCAB_SIZE and config.shape.seq_length == 8192
    count = config.parameter_count()
    assert count == exact
    assert round(count / 1e9, 2) == paper_billions


def test_the_paper_sizes_include_tied_embeddings():
    """The sizes pin down the counting convention: untied (or no) embeddings miss the printed 3.67B."""
    shape = get_model_config("3.67b").shape
    untied = parameter_count(dataclasses.replace(shape, tie_embeddings=False))
    without_embeddings = parameter_count(shape) - shape.vocab_size * shape.hidden_size
    assert round(untied / 1e9, 2) == 4.00
    assert round(without_embeddings / 1e9, 2) == 3.34


def test_4b_config_is_the_top_width_at_36_layers():
    config = get_model_config("4b")
    assert config.shape == dataclasses.replace(get_model_config("3.67b").shape, num_layers=36)
    assert round(config.parameter_count() / 1e9, 2) == 3.87


def test_logical_matrices_name_each_matrix_once():
    shape = dataclasses.replace(TINY, num_experts=2)
    named = logical_matrices(shape)
    # Per layer: q, k, v, proj, the router and 2 experts x (gate, up, down).
    assert len(named) == sum(m.count for m in matrix_shapes(shape)) == 2 * (5 + 2 * 3)
    assert named["1.q"] == (64, 64) and named["0.router"] == (2, 64) and named["1.expert_down.1"] == (64, 128)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="known: .*3.67b"):
        get_model_config("7b")


def test_width_must_split_into_an_even_number_of_heads():
    with pytest.raises(ValueError, match="even multiple of the head dimension 128"):
        paper_shape(384)


# The paper's head dimension and widths, cut to a few layers and a small vocabulary to build on CPU, next to
# the CPU configs, TINY (no QK-norm, default head dimension), a plain MLP, MoE ones and the benchmarks' shapes.
def _built_shapes():
    return [
        get_model_config("cpu-tiny").shape,
        get_model_config("cpu-small").shape,
        paper_shape(256, num_layers=2, vocab_size=1000, seq_length=64),
        dataclasses.replace(paper_shape(512, num_layers=1, vocab_size=500, seq_length=64), tie_embeddings=False),
        TINY,
        dataclasses.replace(TINY, gated_linear_unit=False),
        dataclasses.replace(TINY, num_experts=4),
        dataclasses.replace(TINY, num_experts=3, gated_linear_unit=False),
        *BENCHMARK_SHAPES.values(),
    ]


PARSED_CONFIGS = ["cpu-small", "3.67b"]


def _in_megatron(shapes, flag_sets):
    """One process for everything that needs megatron.training's global state: parameter counts and Muon
    matrices of built models, and TransformerConfigs parsed from flags."""
    from megatron_muon.integration.gpt import build_gpt
    from megatron_muon.integration.parallel_state import model_parallel

    with model_parallel():
        models = [build_gpt(shape) for shape in shapes]
        counts = [sum(p.numel() for p in model.parameters()) for model in models]
        matrices = [_muon_matrices(model) for model in models]
    return counts, matrices, [_transformer_config_from_flags(flags) for flags in flag_sets]


def _muon_matrices(model) -> collections.Counter:
    """(role, rows, cols) of every logical matrix the optimizer orthogonalizes: the parameters Muon routes to
    itself, split as the Megatron integration splits them."""
    from megatron_muon.integration.layouts import logical_shapes
    from megatron_muon.muon import split_params

    params = dict(model.named_parameters())
    found = collections.Counter()
    for name in split_params(model).muon_names:
        for logical, (rows, cols) in logical_shapes(name, params[name], model.config, tp_size=1).items():
            base, _, part = logical.partition(":")
            module = base.split(".")[-2]
            role = part or {"linear_proj": "proj", "linear_fc1": "up", "linear_fc2": "down", "router": "router"}[module]
            found[("expert_" if ".experts." in base else "") + role, rows, cols] += 1
    return found


def _transformer_config_from_flags(flags):
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.arguments import parse_args, validate_args

    # What a CPU training command adds around the model flags: tokenizer, schedule and no CUDA-only fusions.
    sys.argv = [
        "train", *flags, "--micro-batch-size", "1", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
        "--train-iters", "1", "--lr", "1e-3", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
        "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion", "--no-persist-layer-norm",
    ]
    with open(os.devnull, "w") as quiet:
        stdout, sys.stdout = sys.stdout, quiet
        try:
            args = parse_args()
            validate_args(args)
        finally:
            sys.stdout = stdout
    config = core_transformer_config_from_args(args)
    model = {field: getattr(config, field) for field in architecture_kwargs(TINY)}
    model.update(activation_func=config.activation_func.__name__, rotary_base=args.rotary_base,
                 seq_length=args.seq_length, position_embedding_type=args.position_embedding_type,
                 tie_embeddings=not args.untie_embeddings_and_output_weights, transformer_impl=args.transformer_impl)
    return model


@pytest.fixture(scope="module")
def megatron_results():
    flag_sets = [get_model_config(name).megatron_flags("local") for name in PARSED_CONFIGS]
    counts, matrices, parsed = run_ranks(_in_megatron, world_size=1, args=(_built_shapes(), flag_sets))[0]
    return counts, matrices, dict(zip(PARSED_CONFIGS, parsed))


def test_analytic_count_equals_megatron_gptmodel(megatron_results):
    counts, _, _ = megatron_results
    assert counts == [parameter_count(shape) for shape in _built_shapes()]


def test_matrix_shapes_are_the_matrices_muon_gets_in_megatron(megatron_results):
    _, matrices, _ = megatron_results
    expected = [collections.Counter({(m.role, m.rows, m.cols): m.count for m in matrix_shapes(shape)})
                for shape in _built_shapes()]
    assert matrices == expected


@pytest.mark.parametrize("name", PARSED_CONFIGS)
def test_megatron_flags_parse_back_to_the_transformer_config_kwargs(name, megatron_results):
    config = get_model_config(name)
    parsed = megatron_results[2][name]
    expected = config.transformer_config_kwargs()
    expected.update(activation_func=expected["activation_func"].__name__, kv_channels=config.shape.head_dim)
    s = config.shape
    expected.update(rotary_base=s.rotary_base, seq_length=s.seq_length, position_embedding_type="rope",
                    tie_embeddings=True, transformer_impl="local")
    assert parsed == expected
    assert (parsed["qk_layernorm"], parsed["layernorm_epsilon"], parsed["activation_func"]) == (True, 1e-6, "silu")


def test_cpu_configs_match_the_embedded_corpus_vocabulary():
    from megatron_muon.models.registry import CPU_VOCAB_SIZE
    from megatron_muon.data.corpus import DEFAULT_VOCAB_SIZE

    assert get_model_config("cpu-tiny").shape.vocab_size == CPU_VOCAB_SIZE == DEFAULT_VOCAB_SIZE


def test_every_named_config_has_flags():
    for config in MODEL_CONFIGS.values():
        flags = config.megatron_flags("transformer_engine")
        assert flags[flags.index("--transformer-impl") + 1] == "transformer_engine"
        assert flags[flags.index("--num-layers") + 1] == str(config.shape.num_layers)
