"""muP rules as data: each parameter's init std, forward, learning-rate, weight-decay and Adam-eps multipliers.

muP (Yang et al. 2022, "Tensor Programs V", arXiv 2203.03466; TP5 below) lets hyperparameters tuned on a narrow
base (proxy) model transfer to a wider target by scaling each parameter with width. Every number here is a
multiplier relative to the base model: the target's value over the base's value of the same parameter. So each
multiplier is exactly 1 when target == base, and the tuned base run is unchanged.

Ratios are per matrix, from its LOGICAL (TP=1) shape [fan_out, fan_in]: target fan / the base model's fan of the
same matrix. The MLP down projection's fan_in is ffn_hidden, K and V have fan_out num_query_groups x head_dim,
Q has fan_out num_heads x head_dim. When base and target keep every shape ratio (ffn / hidden, heads x head_dim /
hidden, groups x head_dim / hidden), all ratios equal Megatron's single `mup_width_mult = hidden / base_hidden`.

The paper (arXiv 2505.02222, Sec. 3.1, "Table 5" = TP5 Table 9) writes a weight as W = a(n) w, with the trained
parameter w ~ N(0, b(n)) and learning rate c(n) * eta. Relative to the base width n0:

    forward_mult = a(n) / a(n0)      init_std_mult = sqrt(b(n) / b(n0))      lr_mult = c(n) / c(n0)

    Table 5 (r = width ratio of the fan named)   input weights, biases   output weights   hidden weights
    a(n)  multiplier                             sqrt(fan_out)           1/sqrt(fan_in)   1
    b(n)  init variance                          1/fan_out               1/fan_in         1/fan_in
    c(n)  learning rate (Adam)                   1/sqrt(fan_out)         1/sqrt(fan_in)   1/fan_in

One degree of freedom is left (paper App. I: "e.g., to allow weight tying"). This is TP5's abc symmetry:
(a, std, c) -> (a * theta, std / theta, c / theta) trains the same function. It is exact for Muon, whose update
ignores the gradient's scale. For Adam it is exact once eps also scales by theta. A forward multiplier needs a hook
in the model, and Megatron has two: `mup_embedding_mult` on the embedding output and `mup_output_mult` on the
logits. So every other matrix and vector gets its equivalent a = 1 form (TP5 Table 3):

    column (by which fans grow)        init_std_mult   Adam lr_mult
    input   (fan_in fixed)             1               1
    hidden  (both fans grow)           1/sqrt(r_in)    1/r_in
    output  (fan_out fixed)            1/r_in          1/r_in

The column of a q/k/v/proj/gate/up/down/expert matrix is read from its ratios, not its name. K/V with a fixed
number of query groups are readout-like (fan_out fixed), as the `mup` package's `assert_hidden_size_inf` says.
So are expert gate/up with a fixed moe_ffn_hidden. The MoE router is always a readout: its fan_out is num_experts
(Greg Yang, microsoft/mup#48). Norm gains and biases are vectors: Table 5's bias column in a = 1 form, all 1.

Only width is scaled. Depth and the attention logit scale (1/d vs 1/sqrt(d); Megatron's
`mup_base_head_dim`) are not per-parameter rules and are not covered here. Init multipliers apply on top of the base
model's own init of that parameter (Megatron's depth-scaled output-layer init included). Megatron's `use_mup`
init, logit and LR scaling must be off when these rules are applied, so nothing is scaled twice.

Pure Python: no torch, no Megatron. The Megatron integration turns rules into param groups and forward multipliers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from fractions import Fraction

# ---------------------------------------------------------------------------------------------------------------
# Roles: what a parameter is in a GPT. A non-gated MLP's fc1 is "up"; Megatron's fused linear_qkv and gated fc1
# are split into q/k/v and gate/up first (megatron/layouts.py names these logical matrices).
# ---------------------------------------------------------------------------------------------------------------
EMBEDDING, OUTPUT, ROUTER = "embedding", "output", "router"
WIDTH_MATRICES = ("q", "k", "v", "proj", "gate", "up", "down", "expert_gate", "expert_up", "expert_down")
VECTORS = ("norm", "bias")
ROLES = (EMBEDDING, OUTPUT, *WIDTH_MATRICES, ROUTER, *VECTORS)
OPTIMIZERS = ("muon", "adam")


def default_optimizer(role: str) -> str:
    """The paper's routing (Sec. 2, App. G): embeddings, the logits head and norms go to Adam, matrices to Muon."""
    _check_role(role)
    return "adam" if role in (EMBEDDING, OUTPUT, *VECTORS) else "muon"


@dataclass(frozen=True)
class ModelWidths:
    """The logical sizes of a base (proxy) or target model. head_dim is Megatron's kv_channels.

    vocab and num_experts are not widths: no rule scales with them, and only `logical_shape` needs them.
    moe_ffn_hidden defaults to ffn_hidden, as Megatron's moe_ffn_hidden_size does.
    """

    hidden: int
    ffn_hidden: int
    num_heads: int
    num_query_groups: int
    head_dim: int
    vocab: int | None = None
    num_experts: int | None = None
    moe_ffn_hidden: int | None = None

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelWidths.{f.name} must be a positive integer, got {value!r}")
        # GQA: each query group serves num_heads / num_query_groups whole heads (Megatron asserts the same).
        # This is the only integer ratio needed. Width ratios may be fractional (Cerebras-GPT's is 1088/256).
        if self.num_heads % self.num_query_groups:
            raise ValueError(
                f"num_heads {self.num_heads} is not divisible by num_query_groups {self.num_query_groups}: "
                f"each query group must serve a whole number of heads"
            )

    @property
    def expert_ffn_hidden(self) -> int:
        return self.moe_ffn_hidden or self.ffn_hidden

    def widths(self) -> dict[str, int]:
        """Every dimension a fan is made of, by a name an error message can show."""
        return {
            "hidden": self.hidden,
            "ffn_hidden": self.ffn_hidden,
            "num_heads x head_dim": self.num_heads * self.head_dim,
            "num_query_groups x head_dim": self.num_query_groups * self.head_dim,
            "moe_ffn_hidden": self.expert_ffn_hidden,
        }


def logical_shape(role: str, widths: ModelWidths) -> tuple[int, int]:
    """(fan_out, fan_in) of a role's logical matrix, as in torch's [out_features, in_features].

    The embedding maps vocab -> hidden, so it is (hidden, vocab): the transpose of how nn.Embedding stores it.
    """
    _check_role(role)
    w = widths
    q, kv = w.num_heads * w.head_dim, w.num_query_groups * w.head_dim
    shapes = {
        EMBEDDING: (w.hidden, w.vocab),
        OUTPUT: (w.vocab, w.hidden),
        "q": (q, w.hidden),
        "k": (kv, w.hidden),
        "v": (kv, w.hidden),
        "proj": (w.hidden, q),
        "gate": (w.ffn_hidden, w.hidden),
        "up": (w.ffn_hidden, w.hidden),
        "down": (w.hidden, w.ffn_hidden),
        ROUTER: (w.num_experts, w.hidden),
        "expert_gate": (w.expert_ffn_hidden, w.hidden),
        "expert_up": (w.expert_ffn_hidden, w.hidden),
        "expert_down": (w.hidden, w.expert_ffn_hidden),
    }
    if role not in shapes:
        raise ValueError(f"{role!r} is a vector: it has no fan_out x fan_in shape")
    fan_out, fan_in = shapes[role]
    if fan_out is None or fan_in is None:
        missing = "vocab" if role in (EMBEDDING, OUTPUT) else "num_experts"
        raise ValueError(f"the shape of {role!r} needs ModelWidths.{missing}")
    return fan_out, fan_in


def check_base_and_target(base: ModelWidths, target: ModelWidths) -> None:
    """Raise if the base model is wider than the target in any dimension a fan is made of."""
    target_widths = target.widths()
    for name, base_width in base.widths().items():
        if base_width > target_widths[name]:
            raise ValueError(
                f"the muP base model's {name} ({base_width}) is larger than the target's ({target_widths[name]}): "
                f"the base is the narrow proxy the hyperparameters were tuned on; check --mup-base-hidden-size "
                f"and the other base-model sizes"
            )


# ---------------------------------------------------------------------------------------------------------------
# Presets.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """What separates two muP flavours. forward powers: forward_mult = r_hidden ** power on the embedding output /
    the logits; init std and LR follow from the abc symmetry."""

    name: str
    # The key of megatron_muon.muon.SCALE_MODES that the Muon optimizer must use with this preset.
    muon_scale_mode: str
    embedding_forward_power: Fraction
    output_forward_power: Fraction
    # How a Muon matrix's LR scales. "adam": Adam's c(n) of its column. "spectral": whatever keeps the update's
    # spectral norm at the spectral condition (Yang, Simon, Bernstein 2023, arXiv 2310.17813): ||dW||_2 ~
    # sqrt(fan_out / fan_in). Muon's O has unit singular values, so ||dW||_2 = lr * scale(fan_out, fan_in), and the
    # multiplier is sqrt(r_out / r_in) over the growth of `muon_scale_mode`'s scale (`muon_scale_ratio`).
    muon_lr: str
    # True: wd_mult = 1 / lr_mult, so the decay per step, lr * wd, stays at the base value.
    # False: coupled, wd_mult = 1, so the decay shrinks with the LR multiplier.
    independent_weight_decay: bool
    # True: Adam eps scales like the gradient entries it is added to.
    scale_adam_eps: bool

    def __post_init__(self):
        if self.muon_lr not in ("adam", "spectral"):
            raise ValueError(f"preset {self.name}: muon_lr must be 'adam' or 'spectral', got {self.muon_lr!r}")


PRESETS: dict[str, Preset] = {
    # The paper (arXiv 2505.02222 Sec. 3.1): Table 5 taken literally, including the sqrt(r) multiplier on the
    # embedding and the 1/sqrt(r) multiplier on the logits. Muon uses the 0.2 sqrt(max(fan_out, fan_in)) scale and
    # "the same muP scaling that is used for AdamW", i.e. hidden LR 1/fan_in. Note: the muP-exact Muon LR under this
    # scale would be 1/sqrt(fan_in) (derived; Megatron PR #3715 warns the same; preset `essential_exact` uses it).
    # 1/fan_in keeps the per-entry update RMS Adam-like, as the paper intends. Weight decay is coupled ("we consider
    # the coupled setting", Sec. 3). "We do not scale the AdamW eps" (Sec. 3.1).
    "essential": Preset(
        name="essential",
        muon_scale_mode="essential",
        embedding_forward_power=Fraction(1, 2),
        output_forward_power=Fraction(-1, 2),
        muon_lr="adam",
        independent_weight_decay=False,
        scale_adam_eps=False,
    ),
    # `essential` with the muP-exact Muon LR on the paper's scale: everything as the paper's preset (Table 5, the
    # 0.2 sqrt(max(fan_out, fan_in)) update scale, coupled weight decay, Adam eps unscaled) except that Muon
    # matrices take the LR that keeps their updates at the spectral condition. For a hidden matrix both fans grow
    # by r, so the scale grows by sqrt(r) while sqrt(fan_out / fan_in) stays put: lr 1/sqrt(r_in), not the
    # paper's 1/r_in, whose hidden updates shrink like 1/sqrt(width). A readout-like Muon matrix (fixed fan_out,
    # the larger fan_in growing: the router, K/V with fixed query groups) gets 1/r_in, as in `essential`.
    "essential_exact": Preset(
        name="essential_exact",
        muon_scale_mode="essential",
        embedding_forward_power=Fraction(1, 2),
        output_forward_power=Fraction(-1, 2),
        muon_lr="spectral",
        independent_weight_decay=False,
        scale_adam_eps=False,
    ),
    # Spectral muP (Yang, Simon, Bernstein 2023, arXiv 2310.17813) for Muon. The scale is sqrt(fan_out / fan_in),
    # Megatron's `unit_rms_norm` (Bernstein, "Deriving Muon"). It gives ||dW||_2 = lr sqrt(fan_out / fan_in), so
    # the Muon LR is width-independent. Adam parameters follow TP5 Table 8 in Megatron's form: embedding
    # unscaled; logits x 1/r with base init and LR (`mup_output_mult`); hidden LR 1/fan_in. Weight decay is
    # independent: MuAdam scales it by width (microsoft/mup mup/optim.py: `lr /= width_mult; weight_decay *=
    # width_mult`), and Kosson et al. 2025 (arXiv 2510.19093) say muP "requires the independent weight decay
    # variant". Adam eps follows the gradient scale. Everett et al. 2024 (arXiv 2407.05872) say eps must scale
    # with width; Megatron `get_mup_config_overrides` uses eps / m for hidden matrices.
    "spectral": Preset(
        name="spectral",
        muon_scale_mode="unit_rms_norm",
        embedding_forward_power=Fraction(0),
        output_forward_power=Fraction(-1),
        muon_lr="spectral",
        independent_weight_decay=True,
        scale_adam_eps=True,
    ),
}


def muon_scale_ratio(scale_mode: str, r_out: Fraction, r_in: Fraction) -> float:
    """How much Muon's update scale (megatron_muon.muon_config.SCALE_MODES) grows from base to target, from the
    matrix's fan ratios.

    unit_rms_norm, sqrt(fan_out / fan_in): by sqrt(r_out / r_in), exactly. essential, 0.2 sqrt(max(fan_out,
    fan_in)): by the square root of the larger fan's ratio. From ratios alone that is taken to be the faster-growing
    fan, max(r_out, r_in): exact when both fans grow alike (one common width ratio: every hidden matrix of a model
    widened uniformly) and whenever the faster-growing fan is the larger one at base and target (the router and K/V
    with fixed query groups: hidden >= num_experts, group width).
    """
    if scale_mode == "unit_rms_norm":
        return math.sqrt(r_out / r_in)
    if scale_mode == "essential":
        return math.sqrt(max(r_out, r_in))
    raise ValueError(f"no spectral Muon LR rule for the update scale {scale_mode!r}")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown muP preset {name!r} (--mup-preset); choose one of {sorted(PRESETS)}")
    return PRESETS[name]


# ---------------------------------------------------------------------------------------------------------------
# The rule.
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParamRule:
    """Multipliers on the base model's values for one parameter; all 1 at the base width.

    The optimizer is assumed to apply weight decay as lr * wd with both multiplied in, as Megatron param groups'
    lr_mult / wd_mult and torch AdamW do: p <- p * (1 - lr * lr_mult * wd * wd_mult).
    """

    column: str  # "input" | "hidden" | "output" | "vector": the Table 5 column the rule comes from
    init_std_mult: float
    forward_mult: float
    lr_mult: float
    wd_mult: float
    eps_mult: float  # Adam eps; 1 for Muon, which has none

    def init_std(self, base_std: float) -> float:
        """The init std at the target, from the base model's init std of this parameter."""
        return base_std * self.init_std_mult


def column(role: str, base: ModelWidths, target: ModelWidths) -> str:
    """The Table 5 column of a parameter. For q/k/v/proj/MLP/expert matrices, it is read from which fans grow.

    A matrix with neither fan growing goes to "input", whose multipliers are all 1.
    """
    _check_role(role)
    if role in VECTORS:
        return "vector"
    if role == EMBEDDING:
        return "input"
    if role in (OUTPUT, ROUTER):
        return "output"
    r_out, r_in = fan_ratios(role, base, target)
    if r_in == 1:
        return "input"
    return "output" if r_out == 1 else "hidden"


def fan_ratios(role: str, base: ModelWidths, target: ModelWidths) -> tuple[Fraction, Fraction]:
    """(fan_out ratio, fan_in ratio) of a matrix, as exact fractions. Vocab and num_experts count as fixed.

    Those two are not widths, and a proxy may use a smaller vocabulary.
    """
    _check_role(role)
    if role in VECTORS:
        raise ValueError(f"{role!r} is a vector: it has no fan ratios")
    r_hidden = Fraction(target.hidden, base.hidden)
    if role == EMBEDDING:
        return r_hidden, Fraction(1)
    if role in (OUTPUT, ROUTER):
        return Fraction(1), r_hidden
    (base_out, base_in), (target_out, target_in) = logical_shape(role, base), logical_shape(role, target)
    return Fraction(target_out, base_out), Fraction(target_in, base_in)


def rule(
    role: str, base: ModelWidths, target: ModelWidths, preset: str = "essential", optimizer: str | None = None
) -> ParamRule:
    """The muP multipliers of one parameter with `role`. `optimizer` says which optimizer trains it.

    "muon" or "adam"; the default is the paper's routing, `default_optimizer(role)`.

    Tied embeddings: the embedding and output rules of every preset agree on init_std_mult, lr_mult, wd_mult
    and eps_mult. That is the degree of freedom the paper says allows tying: Table 5 gives the input and output
    columns the same b and c when fan_out(input) = fan_in(output) = hidden, and Table 8 gives both constants. So
    the shared weight takes rule(EMBEDDING, ...). Each use site applies its own forward_mult: the embedding output
    and the logits.
    """
    p = get_preset(preset)
    optimizer = optimizer or default_optimizer(role)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} for {role!r}; choose one of {list(OPTIMIZERS)}")
    if optimizer == "muon" and role in (EMBEDDING, OUTPUT, *VECTORS):
        raise ValueError(
            f"{role!r} is trained by Adam: Muon trains hidden 2-D matrices only (paper Sec. 2; Megatron routes "
            f"embedding, output and non-2-D parameters to its scalar optimizer)"
        )
    check_base_and_target(base, target)
    col = column(role, base, target)
    r_hidden = Fraction(target.hidden, base.hidden)
    r_in = Fraction(1) if col == "vector" else fan_ratios(role, base, target)[1]

    # a = 1 form (TP5 Table 3): init std and Adam LR for each column.
    init, lr = {
        "vector": (1.0, 1.0),
        "input": (1.0, 1.0),
        "hidden": (1 / math.sqrt(r_in), 1 / float(r_in)),
        "output": (1 / float(r_in), 1 / float(r_in)),
    }[col]
    # Gradient entries of the a = 1 form, for eps. The backward signal is Theta(1/width) on width-sized
    # activations. It is Theta(1) on a readout's fixed-size output, such as the logits or router scores.
    grad = 1.0 if col == "output" else 1 / float(r_hidden)

    # Embedding and logits take their preset's forward multiplier theta. The symmetry moves init, LR and gradient.
    theta = 1.0
    if role == EMBEDDING:
        theta = float(r_hidden) ** float(p.embedding_forward_power)
    elif role == OUTPUT:
        theta = float(r_hidden) ** float(p.output_forward_power)
    init, lr, grad = init / theta, lr / theta, grad * theta

    if optimizer == "muon" and p.muon_lr == "spectral":
        r_out = fan_ratios(role, base, target)[0]
        lr = math.sqrt(r_out / r_in) / muon_scale_ratio(p.muon_scale_mode, r_out, r_in)
    wd = 1 / lr if p.independent_weight_decay else 1.0
    eps = grad if optimizer == "adam" and p.scale_adam_eps else 1.0
    return ParamRule(column=col, init_std_mult=init, forward_mult=theta, lr_mult=lr, wd_mult=wd, eps_mult=eps)


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"unknown parameter role {role!r}; choose one of {list(ROLES)}")
