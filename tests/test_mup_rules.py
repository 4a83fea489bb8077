"""muP rules: hand-checked multipliers for a 64 -> 256 pair, per-matrix ratios, tying, presets, bad input."""

import math
import random
from dataclasses import replace

import pytest

from megatron_muon.muon import SCALE_MODES
from megatron_muon.mup.rules import (
    PRESETS,
    ROLES,
    VECTORS,
    ModelWidths,
    column,
    default_optimizer,
    logical_shape,
    rule,
)

# Base: hidden 64, ffn 4x, 4 heads of dim 16 in 2 query groups. Target: everything 4x wider.
BASE = ModelWidths(hidden=64, ffn_hidden=256, num_heads=4, num_query_groups=2, head_dim=16, vocab=100, num_experts=8)
TARGET = ModelWidths(
    hidden=256, ffn_hidden=1024, num_heads=16, num_query_groups=8, head_dim=16, vocab=100, num_experts=8
)
MATRICES = [r for r in ROLES if r not in VECTORS]


def fields(r):
    return (r.init_std_mult, r.forward_mult, r.lr_mult, r.wd_mult, r.eps_mult)


def approx(*values):
    return pytest.approx(values, rel=1e-12)


def rules(preset, base=BASE, target=TARGET, optimizer=None):
    return {role: rule(role, base, target, preset, optimizer) for role in ROLES}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("optimizer", [None, "adam"])
def test_every_multiplier_is_one_at_the_base(preset, optimizer):
    for role, r in rules(preset, BASE, BASE, optimizer).items():
        assert fields(r) == approx(1, 1, 1, 1, 1), role


def test_logical_shapes():
    assert logical_shape("embedding", BASE) == (64, 100)  # vocab -> hidden
    assert logical_shape("output", BASE) == (100, 64)
    assert logical_shape("q", BASE) == (64, 64)
    assert logical_shape("k", BASE) == logical_shape("v", BASE) == (32, 64)  # 2 groups x 16
    assert logical_shape("proj", BASE) == (64, 64)
    assert logical_shape("gate", BASE) == logical_shape("up", BASE) == (256, 64)
    assert logical_shape("down", BASE) == (64, 256)
    assert logical_shape("router", BASE) == (8, 64)
    moe = replace(BASE, moe_ffn_hidden=32)
    assert logical_shape("expert_up", moe) == (32, 64) and logical_shape("expert_down", moe) == (64, 32)
    assert logical_shape("expert_gate", BASE) == (256, 64)  # moe_ffn_hidden defaults to ffn_hidden


def test_essential_4x_hand_checked():
    # Table 5 relative to base, r = 4: embedding a = sqrt(r) = 2, std sqrt(1/r) = 1/2, lr 1/sqrt(r) = 1/2;
    # head a = 1/sqrt(r) = 1/2, std 1/2, lr 1/2; hidden std 1/sqrt(r) = 1/2, lr 1/r = 1/4. Coupled wd, eps unscaled.
    r = rules("essential")
    assert fields(r["embedding"]) == approx(0.5, 2, 0.5, 1, 1)
    assert fields(r["output"]) == approx(0.5, 0.5, 0.5, 1, 1)
    for role in ("q", "k", "v", "proj", "gate", "up", "down", "expert_gate", "expert_up", "expert_down"):
        assert r[role].column == "hidden", role
        assert fields(r[role]) == approx(0.5, 1, 0.25, 1, 1), role
    # The router's fan_out is num_experts: a readout in a = 1 form (TP5 Table 3), init var 1/fan_in^2.
    assert r["router"].column == "output"
    assert fields(r["router"]) == approx(0.25, 1, 0.25, 1, 1)
    for role in VECTORS:
        assert fields(r[role]) == approx(1, 1, 1, 1, 1)
    # Effective head W = a w: std a * std_w = 1/4 = 1/r (Table 3's init var 1/fan_in^2), update a * lr = 1/r.
    assert r["output"].forward_mult * r["output"].init_std_mult == pytest.approx(0.25)
    assert r["output"].forward_mult * r["output"].lr_mult == pytest.approx(0.25)
    # Effective embedding: std and update width-independent (Table 3's input column).
    assert r["embedding"].forward_mult * r["embedding"].init_std_mult == pytest.approx(1)
    assert r["embedding"].forward_mult * r["embedding"].lr_mult == pytest.approx(1)


def test_essential_muon_matrices_take_adams_c():
    # The paper: "the same muP scaling that is used for AdamW ... works for Muon".
    for role in ("q", "down", "router"):
        assert rule(role, BASE, TARGET, "essential", "muon") == rule(role, BASE, TARGET, "essential", "adam")


def test_per_matrix_ratios():
    # ffn 8x while hidden 4x: down's fan_in is ffn (lr 1/8); gate/up have fan_in hidden (lr 1/4).
    wide_ffn = replace(TARGET, ffn_hidden=2048)
    assert rule("down", BASE, wide_ffn).lr_mult == pytest.approx(1 / 8)
    assert rule("down", BASE, wide_ffn).init_std_mult == pytest.approx(1 / math.sqrt(8))
    assert rule("up", BASE, wide_ffn).lr_mult == rule("gate", BASE, wide_ffn).lr_mult == pytest.approx(1 / 4)
    # Attention width 2x (8 heads x 16) while hidden 4x: proj's fan_in is heads x head_dim.
    narrow_attn = replace(TARGET, num_heads=8, num_query_groups=4)
    assert rule("proj", BASE, narrow_attn).lr_mult == pytest.approx(1 / 2)
    assert rule("q", BASE, narrow_attn).lr_mult == pytest.approx(1 / 4)
    # Fixed query groups: K/V fan_out stays 2 x 16, so they are readouts (init 1/r_in, not 1/sqrt(r_in)); Q is not.
    fixed_groups = replace(TARGET, num_query_groups=2)
    for role in ("k", "v"):
        assert column(role, BASE, fixed_groups) == "output"
        assert fields(rule(role, BASE, fixed_groups)) == approx(0.25, 1, 0.25, 1, 1)
    assert column("q", BASE, fixed_groups) == "hidden"
    # Fixed expert size: expert gate/up are readouts, expert down (fan_in fixed) is input-like: all 1.
    moe_base, moe_target = replace(BASE, moe_ffn_hidden=32), replace(TARGET, moe_ffn_hidden=32)
    assert column("expert_up", moe_base, moe_target) == "output"
    assert column("expert_down", moe_base, moe_target) == "input"
    assert fields(rule("expert_down", moe_base, moe_target)) == approx(1, 1, 1, 1, 1)


def test_vocab_and_experts_are_not_widths():
    small_vocab = replace(BASE, vocab=50, num_experts=4)
    for preset in PRESETS:
        for role in ("embedding", "output", "router"):
            assert rule(role, small_vocab, TARGET, preset) == rule(role, BASE, TARGET, preset)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_tied_embeddings_share_one_parameter_rule(preset):
    # The shared weight gets one init, lr, wd and eps; only the forward multipliers differ, one per use site.
    emb, out = rule("embedding", BASE, TARGET, preset), rule("output", BASE, TARGET, preset)
    assert (emb.init_std_mult, emb.lr_mult, emb.wd_mult, emb.eps_mult) == approx(
        out.init_std_mult, out.lr_mult, out.wd_mult, out.eps_mult
    )
    # Composed, the logits see embedding-mult x head-mult x W W^T at init: the product of the two conventions'
    # forward multipliers is 1/r for both presets (essential: 2 x 1/2 x (1/2)^2 = 1/4; spectral: 1 x 1/4 x 1).
    assert emb.forward_mult * out.forward_mult * emb.init_std_mult**2 == pytest.approx(0.25)


def test_spectral_4x_hand_checked():
    # Muon (unit_rms_norm): width-independent LR, so wd x 1; init as muP (1/sqrt(r_in)); Muon has no eps.
    muon = rules("spectral", optimizer=None)
    for role in ("q", "k", "v", "proj", "gate", "up", "down"):
        assert fields(muon[role]) == approx(0.5, 1, 1, 1, 1), role
    # Adam everywhere: hidden lr 1/m, eps 1/m, wd x m (MuAdam), init 1/sqrt(m).
    adam = rules("spectral", optimizer="adam")
    for role in ("q", "k", "v", "proj", "gate", "up", "down"):
        assert fields(adam[role]) == approx(0.5, 1, 0.25, 4, 0.25), role
    # Megatron's form: embedding unscaled but eps / m; logits x 1/m with base init and LR, eps / m.
    assert fields(adam["embedding"]) == approx(1, 1, 1, 1, 0.25)
    assert fields(adam["output"]) == approx(1, 0.25, 1, 1, 0.25)
    for role in VECTORS:
        assert fields(adam[role]) == approx(1, 1, 1, 1, 0.25)
    # Router (a readout in a = 1 form): its gradient does not shrink with width, so eps stays; lr 1/m, wd x m.
    assert fields(adam["router"]) == approx(0.25, 1, 0.25, 4, 1)


def test_essential_exact_2x_hand_checked():
    # Target hidden 128 over base hidden 64, every shape ratio kept (ffn 4x hidden, 8 heads of 16 in 4 groups, 8
    # experts): r = 2 for every fan that grows. Essential's rules except the Muon LR:
    #   embedding  a = sqrt(r) = 1.4142, std 1/sqrt(r) = 0.7071, Adam lr 1/sqrt(r) = 0.7071 (Table 5, as essential);
    #   output     a = 1/sqrt(r) = 0.7071, std 1/sqrt(r) = 0.7071, Adam lr 1/sqrt(r) = 0.7071;
    #   hidden     std 1/sqrt(r) = 0.7071. Muon's ||dW||_2 = lr x 0.2 sqrt(max(fan_out, fan_in)): q goes 64x64 ->
    #              128x128, gate 256x64 -> 512x128, down 64x256 -> 128x512, k 32x64 -> 64x128; max(fan) doubles in
    #              each, so the scale grows by sqrt(2), while the spectral condition's sqrt(fan_out / fan_in) stays.
    #              The LR must shrink by 1/sqrt(2) = 0.7071 (essential's 1/r = 0.5 shrinks ||dW||_2 by 1/sqrt(2));
    #   router     8x64 -> 8x128: max(fan) = fan_in doubles (scale x sqrt(2)) and sqrt(fan_out / fan_in) halves by
    #              sqrt(2): lr (1/sqrt(2)) / sqrt(2) = 1/2, essential's 1/r; std 1/r = 0.5 (a readout);
    #   vectors    1. Weight decay coupled (x1), Adam eps unscaled (x1), as essential.
    target = ModelWidths(hidden=128, ffn_hidden=512, num_heads=8, num_query_groups=4, head_dim=16, vocab=100,
                         num_experts=8)
    h = 0.7071067811865476  # 1/sqrt(2)
    r = rules("essential_exact", BASE, target)
    assert fields(r["embedding"]) == approx(h, 1.4142135623730951, h, 1, 1)
    assert fields(r["output"]) == approx(h, h, h, 1, 1)
    for role in ("q", "k", "v", "proj", "gate", "up", "down", "expert_gate", "expert_up", "expert_down"):
        assert fields(r[role]) == approx(h, 1, h, 1, 1), role
    assert fields(r["router"]) == approx(0.5, 1, 0.5, 1, 1)
    for role in VECTORS:
        assert fields(r[role]) == approx(1, 1, 1, 1, 1)
    # Only Muon's LR differs from essential; a hidden matrix trained by Adam keeps Adam's 1/r.
    essential = rules("essential", BASE, target)
    assert all(replace(r[role], lr_mult=0) == replace(essential[role], lr_mult=0) for role in ROLES)
    assert rule("q", BASE, target, "essential_exact", "adam").lr_mult == pytest.approx(0.5)


def test_essential_exact_muon_update_norm_meets_the_spectral_condition():
    # With the essential scale (0.2 sqrt(max)), ||dW||_2 must grow like sqrt(fan_out / fan_in): for one common ratio
    # (q, down), a readout-like K (fixed groups), and unequal ratios where the faster-growing fan is the larger
    # (down and gate with ffn 8x while hidden 4x).
    fixed_groups, wide_ffn = replace(TARGET, num_query_groups=2), replace(TARGET, ffn_hidden=2048)
    for role, target in (("q", TARGET), ("down", TARGET), ("k", fixed_groups), ("down", wide_ffn), ("gate", wide_ffn),
                         ("router", TARGET)):
        (bo, bi), (to, ti) = logical_shape(role, BASE), logical_shape(role, target)
        r = rule(role, BASE, target, "essential_exact", "muon")
        norm_ratio = r.lr_mult * SCALE_MODES["essential"](to, ti) / SCALE_MODES["essential"](bo, bi)
        assert norm_ratio == pytest.approx(math.sqrt((to / ti) / (bo / bi))), role
    # The paper's essential misses it for hidden matrices by 1/sqrt(r) = 1/2 at r = 4.
    (bo, bi), (to, ti) = logical_shape("q", BASE), logical_shape("q", TARGET)
    essential = rule("q", BASE, TARGET, "essential", "muon").lr_mult * SCALE_MODES["essential"](to, ti)
    assert essential / SCALE_MODES["essential"](bo, bi) == pytest.approx(0.5)


def test_presets_name_a_muon_scale_mode():
    assert PRESETS["essential"].muon_scale_mode == "essential"
    assert PRESETS["essential_exact"].muon_scale_mode == "essential"
    assert PRESETS["spectral"].muon_scale_mode == "unit_rms_norm"
    assert all(p.muon_scale_mode in SCALE_MODES for p in PRESETS.values())


def test_spectral_muon_update_norm_meets_the_spectral_condition():
    # ||dW||_2 = lr * lr_mult * scale (O has unit singular values) must grow like sqrt(fan_out / fan_in) of the
    # matrix. That ratio is constant for q under common width, and ~1/sqrt(r_in) for K with fixed groups.
    fixed_groups = replace(TARGET, num_query_groups=2)
    for role, target in (("q", TARGET), ("down", TARGET), ("k", fixed_groups)):
        (bo, bi), (to, ti) = logical_shape(role, BASE), logical_shape(role, target)
        r = rule(role, BASE, target, "spectral", "muon")
        norm_ratio = r.lr_mult * SCALE_MODES["unit_rms_norm"](to, ti) / SCALE_MODES["unit_rms_norm"](bo, bi)
        assert norm_ratio == pytest.approx(math.sqrt((to / ti) / (bo / bi))), role


def _common_ratio_pair(rng, m):
    heads, per_group, head_dim = rng.choice([2, 4, 8]), rng.choice([1, 2]), rng.choice([8, 16, 32])
    hidden, ffn_factor = heads * head_dim * rng.choice([1, 2]), rng.choice([2, 3, 4])
    base = ModelWidths(hidden, ffn_factor * hidden, heads, heads // per_group, head_dim, vocab=rng.randint(10, 99))
    target = ModelWidths(
        m * hidden, ffn_factor * m * hidden, m * heads, m * heads // per_group, head_dim, vocab=rng.randint(10, 99)
    )
    return base, target


@pytest.mark.parametrize("m", [2, 3, 8])
def test_common_ratio_depends_only_on_m(m):
    # Random base/target pairs that keep every shape ratio: all rules are one function of m,
    # Megatron's mup_width_mult.
    rng = random.Random(m)
    reference = None
    for _ in range(20):
        base, target = _common_ratio_pair(rng, m)
        got = {(p, o): rules(p, base, target, o) for p in PRESETS for o in (None, "adam")}
        reference = reference or got
        for key in got:
            for role in ROLES:
                assert fields(got[key][role]) == approx(*fields(reference[key][role])), (key, role)
    # ...and they are Megatron's: hidden init sigma/sqrt(m), Adam hidden lr and eps / m, logits x 1/m.
    adam = reference[("spectral", "adam")]
    assert fields(adam["down"]) == approx(1 / math.sqrt(m), 1, 1 / m, m, 1 / m)
    assert adam["output"].forward_mult == pytest.approx(1 / m)
    assert reference[("essential", None)]["q"].lr_mult == pytest.approx(1 / m)


def test_default_routing_is_the_papers():
    assert [r for r in ROLES if default_optimizer(r) == "adam"] == ["embedding", "output", "norm", "bias"]
    assert rule("norm", BASE, TARGET, "spectral").eps_mult == pytest.approx(0.25)  # routed to Adam by default


def test_init_std_from_base_std():
    assert rule("q", BASE, TARGET).init_std(0.02) == pytest.approx(0.01)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: rule("q", BASE, TARGET, preset="mup"), r"unknown muP preset 'mup' \(--mup-preset\).*essential"),
        (lambda: rule("qkv", BASE, TARGET), r"unknown parameter role 'qkv'.*'embedding'"),
        (lambda: rule("q", BASE, TARGET, optimizer="sgd"), r"unknown optimizer 'sgd'.*muon"),
        (lambda: rule("embedding", BASE, TARGET, optimizer="muon"), r"trained by Adam"),
        (lambda: rule("norm", BASE, TARGET, optimizer="muon"), r"trained by Adam"),
        (lambda: rule("q", TARGET, BASE), r"base model's hidden \(256\).*--mup-base-hidden-size"),
        (lambda: rule("q", BASE, replace(TARGET, ffn_hidden=128)), r"base model's ffn_hidden \(256\)"),
        (lambda: logical_shape("norm", BASE), r"vector"),
        (lambda: logical_shape("output", replace(BASE, vocab=None)), r"needs ModelWidths.vocab"),
        (lambda: logical_shape("router", replace(BASE, num_experts=None)), r"needs ModelWidths.num_experts"),
        (lambda: ModelWidths(64, 256, 4, 3, 16), r"num_heads 4 is not divisible by num_query_groups 3"),
        (lambda: ModelWidths(0, 256, 4, 2, 16), r"hidden must be a positive integer, got 0"),
        (lambda: ModelWidths(64, -1, 4, 2, 16), r"ffn_hidden must be a positive integer"),
        (lambda: ModelWidths(64, 256, 4, 2, 16.0), r"head_dim must be a positive integer"),
        (lambda: ModelWidths(64, 256, 4, 2, 16, vocab=0), r"vocab must be a positive integer"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
