"""Single-device Muon: the paper's update by hand, agreement with torch.optim.Muon, routing, and bad input."""

import io
import math

import pytest
import torch
from torch import nn

from megatron_muon.muon import Muon, MuonWithAdamW, split_params, update_scale


def jordan_composed(sigma: float, steps: int = 5) -> float:
    """Jordan's quintic applied `steps` times to one scalar: hand arithmetic, independent of the matrix code."""
    for _ in range(steps):
        sigma = 3.4445 * sigma - 4.7750 * sigma**3 + 2.0315 * sigma**5
    return sigma


def test_hand_checked_two_steps_on_a_rank_one_gradient():
    # With rank-1 gradients g_t * u v^T, momentum and the Nesterov input stay multiples of u v^T, Newton-Schulz
    # sees a single singular value ~1 and returns jordan_composed(1) * u v^T: the whole update is scalar algebra.
    u = torch.tensor([3.0, 4.0]) / 5.0
    v = torch.tensor([1.0, 2.0, 2.0]) / 3.0
    w0 = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.25, -0.75]])
    lr, wd, beta = 0.1, 0.01, 0.95
    w = nn.Parameter(w0.clone())
    opt = Muon([w], lr=lr, weight_decay=wd, momentum=beta, ns_precision="fp32")
    expected = w0.clone()
    momentum = 0.0
    for g in (2.0, -0.5):
        w.grad = g * torch.outer(u, v)
        opt.step()
        momentum = g + beta * momentum
        nesterov = g + beta * momentum
        norm = abs(nesterov)  # ||c u v^T||_F = |c| for unit u, v
        o = math.copysign(jordan_composed(norm / (norm + 1e-7)), nesterov)
        expected = expected * (1 - lr * wd) - lr * 0.2 * math.sqrt(3) * o * torch.outer(u, v)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(opt.state[w]["momentum_buffer"], momentum * torch.outer(u, v))


def test_without_nesterov_orthogonalizes_the_momentum():
    w = nn.Parameter(torch.zeros(2, 2))
    opt = Muon([w], lr=1.0, weight_decay=0.0, nesterov=False, scale_mode="unit_rms_norm", ns_precision="fp32")
    w.grad = torch.diag(torch.tensor([2.0, 1e-9]))  # second direction far below 1e-3 of the first: stays ~0
    opt.step()
    assert float(w.detach()[0, 0]) == pytest.approx(-jordan_composed(2.0 / (2.0 + 1e-7)), rel=1e-5)
    assert abs(float(w.detach()[1, 1])) < 1e-5


def _random_params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in shapes]


@pytest.mark.parametrize("precision,tol", [("bf16", 0.03), ("fp32", 0.03)])
def test_matches_torch_optim_muon_over_several_steps(precision, tol):
    # torch.optim.Muon keeps an EMA (1 - beta) momentum and runs Newton-Schulz in bf16; the EMA is ours times
    # (1 - beta), which Frobenius normalization removes, so only bf16 rounding separates the two.
    shapes = [(64, 32), (32, 64), (48, 48)]
    ours, theirs = _random_params(shapes, 0), _random_params(shapes, 0)
    opt_ours = Muon(ours, lr=0.02, weight_decay=0.1, ns_precision=precision)
    opt_theirs = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in ours]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b, w0 in zip(ours, theirs, start):
        delta_ours, delta_theirs = a.detach() - w0, b.detach() - w0
        assert float((delta_ours - delta_theirs).norm() / delta_theirs.norm()) <= tol


def test_same_shape_matrices_batched_equal_one_at_a_time():
    shapes = [(16, 24)] * 3 + [(24, 16)]
    together, alone = _random_params(shapes, 2), _random_params(shapes, 2)
    opt = Muon(together, lr=0.05, ns_precision="fp32")
    singles = [Muon([p], lr=0.05, ns_precision="fp32") for p in alone]
    for step in range(3):
        for i, (a, b) in enumerate(zip(together, alone)):
            a.grad = torch.randn(a.shape, generator=torch.Generator().manual_seed(10 * step + i))
            b.grad = a.grad.clone()
        opt.step()
        for s in singles:
            s.step()
    for a, b in zip(together, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_parameters_without_gradients_are_untouched():
    w = nn.Parameter(torch.randn(4, 4))
    before = w.detach().clone()
    opt = Muon([w], lr=0.1)
    opt.step()
    assert torch.equal(w.detach(), before) and not opt.state[w]


def test_scale_modes():
    assert update_scale("essential", 10240, 2560) == pytest.approx(0.2 * math.sqrt(10240))
    assert update_scale("spectral", 2560, 10240) == pytest.approx(math.sqrt(10240))
    assert update_scale("unit_rms_norm", 1280, 2560) == pytest.approx(math.sqrt(0.5))
    assert update_scale("shape_scaling", 1280, 2560) == 1.0
    assert update_scale("shape", 2560, 1280) == pytest.approx(math.sqrt(2))
    assert update_scale("spectral", 64, 64, extra_factor=0.2) == pytest.approx(update_scale("essential", 64, 64))


# --- routing -----------------------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.attn_qkv = nn.Linear(16, 48, bias=True)
        self.mlp_up = nn.Linear(16, 64, bias=False)
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 50, bias=False)
        if tie:
            self.lm_head.weight = self.embed_tokens.weight


@pytest.mark.parametrize("tie", [True, False])
def test_split_params_routes_matrices_to_muon_and_the_rest_to_adamw(tie):
    split = split_params(TinyLM(tie))
    assert split.muon_names == ["attn_qkv.weight", "mlp_up.weight"]
    expected_adamw = {"embed_tokens.weight", "attn_qkv.bias", "norm.weight", "norm.bias"} | (set() if tie else {"lm_head.weight"})
    assert set(split.adamw_names) == expected_adamw
    assert len(split.muon) + len(split.adamw) == len({id(p) for p in TinyLM(tie).parameters()})


def test_megatron_embedding_tag_is_respected():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    model[1].weight.is_embedding_or_output_parameter = True
    split = split_params(model)
    assert split.muon_names == ["0.weight"] and "1.weight" in split.adamw_names


def test_muon_with_adamw_equals_muon_plus_torch_adamw():
    torch.manual_seed(0)
    model = TinyLM(tie=False)
    reference = TinyLM(tie=False)
    reference.load_state_dict(model.state_dict())
    combined = MuonWithAdamW.for_model(model, lr=0.01, weight_decay=0.05, ns_precision="fp32")
    ref_split = split_params(reference)
    ref_muon = Muon(ref_split.muon, lr=0.01, weight_decay=0.05, ns_precision="fp32")
    ref_adamw = torch.optim.AdamW(ref_split.adamw, lr=0.01, weight_decay=0.05, betas=(0.95, 0.95), eps=1e-8)
    tokens = torch.randint(0, 50, (4, 6))
    for _ in range(4):
        for m in (model, reference):
            m.zero_grad()
            h = m.norm(torch.relu(m.attn_qkv(m.embed_tokens(tokens)))[..., :16] + m.mlp_up(m.embed_tokens(tokens))[..., :16])
            nn.functional.cross_entropy(m.lm_head(h).flatten(0, 1), tokens.flatten()).backward()
        combined.step()
        ref_muon.step()
        ref_adamw.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_state_dict_round_trip_resumes_identically():
    params = _random_params([(8, 12), (12, 8)], 3)
    twin = _random_params([(8, 12), (12, 8)], 3)
    opt = Muon(params, lr=0.05)
    for step in range(2):
        for p, q in zip(params, twin):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = p.grad.clone()
        opt.step()
    with torch.no_grad():
        for p, q in zip(params, twin):
            q.copy_(p)
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)  # through bytes, as a checkpoint would (load_state_dict does not copy)
    saved.seek(0)
    resumed = Muon(twin, lr=0.05)
    resumed.load_state_dict(torch.load(saved))
    for p, q in zip(params, twin):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    opt.step()
    resumed.step()
    for p, q in zip(params, twin):
        assert torch.equal(p, q)


# --- bad input fails at construction ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8,), (2, 3, 4)])
def test_non_matrix_parameter_is_an_error(shape):
    with pytest.raises(ValueError, match="2-D weight matrices only"):
        Muon([nn.Parameter(torch.zeros(*shape))])


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(coefficients="cubic"), r"coefficients\) is not one of"),
        (dict(ns_precision="int8"), "unknown Newton-Schulz precision"),
        (dict(scale_mode="rms"), r"scale_mode\) is not one of"),
        (dict(momentum=1.0), r"momentum must be in \[0, 1\)"),
        (dict(extra_scale_factor=float("nan")), r"extra_scale_factor must be in \(0, inf\)"),
        (dict(ns_precision="fp8", coefficients="polar_express"), "unstable in fp8"),
    ],
)
def test_bad_options_are_errors(options, message):
    with pytest.raises(ValueError, match=message):
        Muon([nn.Parameter(torch.zeros(4, 4))], **options)


# The old spelling of ns_precision, and a layout setting: a single-device Muon has no fused weights to split.
@pytest.mark.parametrize("options", [dict(precision="bf16"), dict(split_qkv=False)])
def test_unknown_option_is_an_error(options):
    with pytest.raises(TypeError, match=f"unknown Muon options \\['{next(iter(options))}'\\]"):
        Muon([nn.Parameter(torch.zeros(4, 4))], **options)


def test_fp8_without_float8_support_is_an_error(monkeypatch):
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(RuntimeError, match="precision 'fp8' needs"):
        Muon([nn.Parameter(torch.zeros(4, 4))], ns_precision="fp8")
