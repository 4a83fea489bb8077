"""muP on Megatron's GPT (`megatron_muon/integration/mup.py`): rules per logical matrix, init, param groups, flags.

The target model has hidden 128, 8 query heads in 4 K/V groups of head dim 16 and a gated MLP of 256; the base
(proxy) has hidden 64. Hand-derived values (essential preset, r = 2 for every width unless said otherwise):
hidden matrices init x 1/sqrt(2) and LR x 1/2; the embedding (Table 5 input column with the sqrt(r) forward
multiplier) init and LR x 1/sqrt(2); an untied head (output column, forward 1/sqrt(r)) init and LR x 1/sqrt(2).
"""

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch

from megatron_muon.testing.ranks import run_ranks
from tests.test_distributed_muon import _assemble, _logical_pieces

pytestmark = pytest.mark.multirank

LR, MIN_LR, EPS = 1e-2, 1e-3, 1e-8
SQRT_HALF = 1 / math.sqrt(2)


def _target(**changes):
    from megatron_muon.models.shapes import TINY

    return dataclasses.replace(
        TINY, hidden_size=128, num_attention_heads=8, num_query_groups=4, ffn_hidden_size=256, **changes
    )


def _build(shape, preset: str | None, base_hidden: int = 64, **base):
    """The model under the current parallel state; with a preset, muP applied with a base of `base_hidden`."""
    from megatron_muon.integration.gpt import build_gpt
    from megatron_muon.integration.mup import MupSpec, apply_mup, base_widths, target_widths, transformer_config_fields

    if preset is None:
        return build_gpt(shape, torch.float32), None
    head_dim = shape.hidden_size // shape.num_attention_heads
    model = build_gpt(shape, torch.float32, **transformer_config_fields(preset, base_hidden, shape.hidden_size, head_dim))
    spec = MupSpec(preset, base_widths(target_widths(model.config), base_hidden, **base))
    return model, apply_mup([model], spec)


def _block_std(model, role_suffix: str, layer: int = 0) -> float:
    """Std of one logical matrix of layer `layer` (TP=1): q/k/v rows of linear_qkv, gate/up of fc1, proj, down."""
    from megatron_muon.integration.layouts import LayoutOptions, matrix_blocks

    names = {"q": "self_attention.linear_qkv", "k": "self_attention.linear_qkv", "v": "self_attention.linear_qkv",
             "proj": "self_attention.linear_proj", "gate": "mlp.linear_fc1", "up": "mlp.linear_fc1",
             "down": "mlp.linear_fc2"}
    if role_suffix == "embedding":
        return float(model.embedding.word_embeddings.weight.std())
    if role_suffix == "output":
        return float(model.output_layer.weight.std())
    name = f"decoder.layers.{layer}.{names[role_suffix]}.weight"
    param = dict(model.named_parameters())[name]
    values = []
    for b in matrix_blocks(name, param, model.config, 0, 1, LayoutOptions(True, True)):
        if b.matrix in (name, f"{name}:{role_suffix}"):
            r = b.local
            values.append(param.detach()[r.row0 : r.row0 + r.rows, r.col0 : r.col0 + r.cols].flatten())
    return float(torch.cat(values).std())


def _rules_and_stds(tie: bool):
    """Per-parameter rules of the target, and the init std of each logical matrix for SP (base init) and muP."""
    from megatron_muon.integration.parallel_state import model_parallel

    roles = ["embedding", "q", "k", "v", "proj", "gate", "up", "down"] + ([] if tie else ["output"])
    out = {}
    with model_parallel(tensor_parallel=1, seed=7):
        sp, _ = _build(_target(tie_embeddings=tie), None)
        out["sp_std"] = {r: _block_std(sp, r) for r in roles}
    with model_parallel(tensor_parallel=1, seed=7):
        mup, rules = _build(_target(tie_embeddings=tie), "essential")
        out["mup_std"] = {r: _block_std(mup, r) for r in roles}
        out["rules"] = {n: dataclasses.asdict(r) for n, r in rules.items()}
        out["forward"] = (mup.config.mup_embedding_mult, mup.config.mup_output_mult)
    with model_parallel(tensor_parallel=1, seed=7):
        # A base whose ffn is a quarter of the target's (r_ffn = 4 while r_hidden = 2) and whose K/V head count
        # is the target's (K/V readout-like): per-matrix ratios, not one width multiplier.
        _, uneven = _build(_target(tie_embeddings=tie), "essential", base_ffn_hidden=64, base_num_query_groups=4)
        out["uneven"] = {n: dataclasses.asdict(r) for n, r in uneven.items()}
    return out


@pytest.fixture(scope="module")
def tied():
    (result,) = run_ranks(_rules_and_stds, 1, (True,))
    return result


def test_rules_per_parameter_essential(tied):
    rules = tied["rules"]
    layer = "decoder.layers.0."
    for name in ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", "mlp.linear_fc1.weight",
                 "mlp.linear_fc2.weight"):
        r = rules[layer + name]
        assert (r["column"], r["lr_mult"], r["wd_mult"], r["eps_mult"]) == ("hidden", 0.5, 1.0, 1.0), name
        assert r["init_std_mult"] == pytest.approx(SQRT_HALF)
    emb = rules["embedding.word_embeddings.weight"]  # tied: the shared weight takes the embedding's rule
    assert (emb["lr_mult"], emb["init_std_mult"], emb["forward_mult"]) == pytest.approx((SQRT_HALF, SQRT_HALF, 2**0.5))
    norm = rules[layer + "input_layernorm.weight"]
    assert (norm["column"], norm["lr_mult"], norm["init_std_mult"]) == ("vector", 1.0, 1.0)
    # Megatron's own fields carry the preset's forward multipliers.
    assert tied["forward"] == pytest.approx((2**0.5, SQRT_HALF))


def test_per_matrix_ratios_mlp_down_and_gqa_kv(tied):
    uneven = tied["uneven"]
    assert uneven["decoder.layers.0.mlp.linear_fc2.weight"]["lr_mult"] == 0.25  # fan_in = ffn: r = 4
    assert uneven["decoder.layers.0.mlp.linear_fc2.weight"]["init_std_mult"] == pytest.approx(0.5)
    assert uneven["decoder.layers.0.mlp.linear_fc1.weight"]["lr_mult"] == 0.5  # fan_in = hidden: r = 2
    # K/V with a fixed head count are readouts (fan_out fixed): LR 1/r like Q, so one group holds the fused QKV.
    assert uneven["decoder.layers.0.self_attention.linear_qkv.weight"]["lr_mult"] == 0.5


def test_init_follows_the_rule_per_logical_matrix(tied):
    """muP std / SP std of each logical matrix = the rule's init multiplier (sampling error of ~16k entries: <3%)."""
    expected = {"embedding": SQRT_HALF, "q": SQRT_HALF, "k": SQRT_HALF, "v": SQRT_HALF, "proj": SQRT_HALF,
                "gate": SQRT_HALF, "up": SQRT_HALF, "down": SQRT_HALF}
    for role, mult in expected.items():
        ratio = tied["mup_std"][role] / tied["sp_std"][role]
        assert ratio == pytest.approx(mult, rel=0.05), (role, ratio)


def test_untied_head_is_an_output_readout():
    (result,) = run_ranks(_rules_and_stds, 1, (False,))
    head = result["rules"]["output_layer.weight"]
    assert (head["column"], head["lr_mult"], head["init_std_mult"]) == ("output", pytest.approx(SQRT_HALF),
                                                                         pytest.approx(SQRT_HALF))
    # Megatron inits an untied head with the (unscaled) embedding init under use_mup; the rule rescales it.
    assert result["mup_std"]["output"] / result["sp_std"]["output"] == pytest.approx(SQRT_HALF, rel=0.05)


def _init_pieces(tp: int, preset: str):
    from megatron.core import parallel_state as ps

    from megatron_muon.integration.parallel_state import model_parallel

    with model_parallel(tensor_parallel=tp, seed=11):
        model, rules = _build(_target(), preset)
        rank = ps.get_tensor_model_parallel_rank()
        return dict(config="init", pieces=_logical_pieces(model, rank, tp),
                    rules={n: dataclasses.astuple(r) for n, r in rules.items()})


@pytest.mark.parametrize("preset", ["essential", "spectral"])
def test_tp2_gives_the_tp1_multipliers_and_init(preset):
    (one,) = run_ranks(_init_pieces, 1, (1, preset))
    two = run_ranks(_init_pieces, 2, (2, preset))
    assert all(r["rules"] == one["rules"] for r in two)
    a, b = _assemble([[one]], "init"), _assemble([[r] for r in two], "init")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _param_groups(optimizer_name: str, preset: str):
    """(lr_mult, eps_mult, wd_mult) the built optimizer's groups give each parameter, and its rule's."""
    from megatron_muon.integration.flags import MuonOptimizerConfig
    from megatron_muon.integration.optimizer import _main_param_ranges
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import MupSetup, Trainer, TrainingSetup

    with model_parallel(tensor_parallel=1, seed=3):
        config = MuonOptimizerConfig(optimizer=optimizer_name, lr=LR, min_lr=MIN_LR, weight_decay=0.1, adam_eps=EPS,
                                     use_distributed_optimizer=True, muon_ns_precision="fp32")
        trainer = Trainer(TrainingSetup(_target(tie_embeddings=False), config, mup=MupSetup(preset, base_hidden=64)))
        names = {p: n for n, p in trainer.models[0].named_parameters()}
        seen = {}
        for inner in trainer.optimizer.chained_optimizers:
            model_of_main = {id(main): p for p, (main, _, _) in _main_param_ranges(inner, distributed=True).items()}
            for group in inner.optimizer.param_groups:
                for main in group["params"]:
                    model_param = model_of_main[id(main)]
                    seen[names[model_param]] = (group["max_lr"] / LR, group["min_lr"] / MIN_LR,
                                                group.get("eps", EPS) / EPS, group.get("wd_mult", 1.0))
        return seen, {n: dataclasses.asdict(r) for n, r in trainer.mup_rules.items()}


@pytest.mark.parametrize("optimizer_name,preset", [("muon", "essential"), ("muon", "spectral"), ("adam", "spectral")])
def test_param_groups_carry_the_rules(optimizer_name, preset):
    """The plugin's Muon + Adam and Megatron's own Adam: max_lr, min_lr, eps and wd_mult per parameter = its rule."""
    (result,) = run_ranks(_param_groups, 1, (optimizer_name, preset))
    seen, rules = result
    assert seen.keys() == rules.keys()
    for name, (lr_mult, min_lr_mult, eps_mult, wd_mult) in seen.items():
        r = rules[name]
        standard_wd = 0.0 if name.endswith("layernorm.weight") else 1.0  # Megatron: no decay on 1-D params
        assert (lr_mult, min_lr_mult, eps_mult) == pytest.approx((r["lr_mult"], r["lr_mult"], r["eps_mult"])), name
        assert wd_mult == pytest.approx(r["wd_mult"] * standard_wd), name
    if preset == "spectral":  # Muon's LR is width-independent; Adam's hidden LR and eps go as 1/r
        fc1 = seen["decoder.layers.0.mlp.linear_fc1.weight"]
        assert (fc1[0], fc1[2]) == ((1.0, 1.0) if optimizer_name == "muon" else (0.5, 0.5))


def _apply_twice_and_mismatch():
    from megatron_muon.integration.gpt import build_gpt
    from megatron_muon.integration.mup import MupSpec, apply_mup, base_widths, target_widths
    from megatron_muon.integration.parallel_state import model_parallel

    errors = []
    with model_parallel(tensor_parallel=1, seed=3):
        model, _ = _build(_target(), "essential")
        spec = MupSpec("essential", base_widths(target_widths(model.config), 64))
        for call in (lambda: apply_mup([model], spec),
                     # Megatron's default use_mup multipliers (embedding 1, logits 1/m), not the preset's.
                     lambda: apply_mup([build_gpt(_target(), torch.float32, use_mup=True, mup_base_hidden_size=64)], spec)):
            try:
                call()
                errors.append(None)
            except (RuntimeError, ValueError) as err:
                errors.append(str(err))
    return errors


def test_applying_twice_or_to_a_mismatched_config_fails():
    (errors,) = run_ranks(_apply_twice_and_mismatch, 1, ())
    assert "already applied" in errors[0]
    assert "TransformerConfig.mup_" in errors[1] and "transformer_config_fields" in errors[1]


def _args(**changes) -> argparse.Namespace:
    base = dict(use_mup=True, mup_preset=None, optimizer="muon", hidden_size=128, ffn_hidden_size=256,
                num_attention_heads=8, num_query_groups=4, group_query_attention=True, kv_channels=16,
                mup_base_hidden_size=64, mup_base_head_dim=None, mup_base_ffn_hidden_size=None,
                mup_base_num_query_groups=None, mup_embedding_mult=1.0, mup_output_mult=1.0, decoupled_lr=None)
    return argparse.Namespace(**{**base, **changes})


def test_flags_resolve_to_megatron_fields():
    from megatron_muon.integration.flags import resolve_mup_args

    args = _args()
    resolve_mup_args(args)  # --optimizer muon with --use-mup: the paper's preset
    assert (args.mup_preset, args.mup_embedding_mult, args.mup_output_mult) == ("essential", pytest.approx(2**0.5),
                                                                                pytest.approx(SQRT_HALF))
    assert args.mup_base_head_dim == 16  # the base's head dim: 1/sqrt(16) attention scale at the base width
    adam = _args(optimizer="adam")
    resolve_mup_args(adam)  # no preset: megatron-core's own muP, untouched
    assert (adam.mup_preset, adam.mup_output_mult) == (None, 1.0)
    spectral = _args(mup_preset="spectral", mup_output_mult=0.5)  # the value the preset sets anyway
    resolve_mup_args(spectral)
    assert (spectral.mup_embedding_mult, spectral.mup_output_mult) == (1.0, 0.5)


@pytest.mark.parametrize("changes,message", [
    (dict(use_mup=False, mup_preset="essential"), "--mup-preset needs --use-mup"),
    (dict(mup_output_mult=0.3), "--mup-output-mult 0.3 conflicts with --mup-preset essential"),
    (dict(decoupled_lr=1e-3), "--decoupled-lr"),
    (dict(mup_base_hidden_size=256), "larger than the target"),
    (dict(ffn_hidden_size=255), "127.5 is not an integer; give it with --mup-base-ffn-hidden-size"),
    (dict(mup_base_hidden_size=16), "1 heads, not a multiple of the target's 2 heads per query group"),
    (dict(mup_base_head_dim=12.5), "--mup-base-head-dim 12.5 must be an integer"),
])
def test_bad_mup_flags_fail_naming_the_flag(changes, message):
    from megatron_muon.integration.flags import resolve_mup_args

    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        resolve_mup_args(_args(**changes))
