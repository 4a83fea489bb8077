"""Every Muon setting, once: its default, what it accepts, its help text, and its Megatron spelling.

`MuonConfig` is the single source the rest derives from: the single-device `Muon` takes its fields as keywords
(muon.py), the distributed step takes one `MuonConfig` (runtime/distributed_muon.py), and the Megatron integration
generates `MuonOptimizerConfig`'s `muon_*` fields and the `--muon-*` flags from it (integration/flags.py).

Building one validates it: types, ranges and choices, and every combination the Newton-Schulz engine would refuse
at its first step, so a bad command line fails before any model is built. Each message names the Megatron flags
involved. Whether a device can run the precision (fp8 needs an FP8 GEMM) is `check_device`, which takes the
device.

Floor 1: torch and newton_schulz only; no Megatron, no torch.distributed.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from megatron_muon.newton_schulz import (
    COEFFICIENT_ALIASES,
    COEFFICIENT_SETS,
    METHODS,
    PRECISIONS,
    check_fp8_coefficients,
    check_gram_precisions,
    check_precision,
    precision_schedule,
)

# Update scales, one table for every spelling a user may know (megatron-core's names are canonical).
# fan_out = rows, fan_in = columns of a torch weight [out_features, in_features].
SCALE_MODES: dict[str, Callable[[int, int], float]] = {
    # The paper's (from Moonlight): RMS of O times this equals 0.2, AdamW's typical update RMS.
    "essential": lambda fan_out, fan_in: 0.2 * math.sqrt(max(fan_out, fan_in)),
    # megatron-core `spectral` (Kimi): sqrt(max); with extra scale 0.2 it equals `essential`.
    "spectral": lambda fan_out, fan_in: math.sqrt(max(fan_out, fan_in)),
    # megatron-core `unit_rms_norm` (Bernstein's spectral condition, muP-natural): sqrt(fan_out / fan_in).
    "unit_rms_norm": lambda fan_out, fan_in: math.sqrt(fan_out / fan_in),
    # megatron-core `shape_scaling` (Keller Jordan's muon.py): sqrt(max(1, fan_out / fan_in)).
    "shape_scaling": lambda fan_out, fan_in: math.sqrt(max(1.0, fan_out / fan_in)),
}
SCALE_ALIASES: dict[str, str] = {"shape": "shape_scaling"}

# `auto` picks standard or Gram Newton-Schulz per matrix shape, so it may run either.
_METHODS_RUN: dict[str, tuple[str, ...]] = {"standard": ("standard",), "gram": ("gram",), "auto": ("standard", "gram")}


@dataclass(frozen=True)
class Range:
    """An interval of accepted numbers; NaN lies in none, and an open infinite end refuses infinity."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def __contains__(self, x: float) -> bool:
        above = self.low < x if self.low_open else self.low <= x
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


@dataclass(frozen=True)
class Setting:
    """How one MuonConfig field meets Megatron, and what it accepts beyond its type.

    `flag` is the one that sets a non-default value (for a boolean, the switch that turns it off); `choices` are
    canonical names, `aliases` other spellings that mean one of them. `layout` settings say how Megatron's fused
    weights split into matrices: an optimizer over plain matrices has nothing to split. `runtime` settings say how
    the distributed step runs, never what it computes: a single-device optimizer has nothing to run that way.
    """

    megatron_field: str
    flag: str
    help: str
    range: Range | None = None
    choices: tuple[str, ...] = ()
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    layout: bool = False
    runtime: bool = False

    @property
    def accepted(self) -> list[str]:
        return [*self.choices, *sorted(self.aliases)]


def _setting(default, megatron_field: str, flag: str, help: str, **spec) -> dataclasses.Field:
    return dataclasses.field(default=default, metadata={"setting": Setting(megatron_field, flag, help, **spec)})


@dataclass(frozen=True)
class MuonConfig:
    """The Muon update and its Newton-Schulz orthogonalization; defaults are the paper's (arXiv 2505.02222)."""

    momentum: float = _setting(
        0.95, "muon_momentum", "--muon-momentum", "Muon momentum beta: M <- G + beta M.", range=Range(0.0, 1.0)
    )
    nesterov: bool = _setting(
        True, "muon_nesterov", "--no-muon-nesterov",
        "Orthogonalize the Nesterov look-ahead G + beta M (on by default); --no-muon-nesterov orthogonalizes M.",
    )
    ns_steps: int = _setting(
        5, "muon_num_ns_steps", "--muon-num-ns-steps", "Newton-Schulz iterations.", range=Range(1)
    )
    coefficients: str = _setting(
        "jordan", "muon_coefficient_type", "--muon-coefficient-type",
        "Newton-Schulz coefficients: jordan (the paper's; megatron-core calls it simple), quintic (megatron-core's "
        "default), polar_express.",
        choices=tuple(COEFFICIENT_SETS), aliases=COEFFICIENT_ALIASES,
    )
    ns_precision: str = _setting(
        "bf16", "muon_ns_precision", "--muon-ns-precision",
        f"Newton-Schulz GEMM operands: one of {list(PRECISIONS)} (fp8 = e4m3, row-wise scaled), or a schedule "
        f"'low>high' / 'low*k>high' (e.g. fp8>bf16: fp8 for the first iterations, the measured split unless k is "
        f"given).",
    )
    ns_method: str = _setting(
        "standard", "muon_ns_method", "--muon-ns-method",
        "Newton-Schulz on the matrix (standard), on its Gram matrix (gram: fewer FLOPs on rectangular matrices "
        "such as the MLP's), or gram where the aspect ratio pays (auto).",
        choices=METHODS,
    )
    scale_mode: str = _setting(
        "essential", "muon_scale_mode", "--muon-scale-mode",
        "Muon update scale: essential 0.2*sqrt(max(m,n)) (the paper's), spectral sqrt(max(m,n)), "
        "unit_rms_norm sqrt(fan_out/fan_in), shape_scaling sqrt(max(1,fan_out/fan_in)).",
        choices=tuple(SCALE_MODES), aliases=SCALE_ALIASES,
    )
    extra_scale_factor: float = _setting(
        1.0, "muon_extra_scale_factor", "--muon-extra-scale-factor", "Multiplies the Muon update scale of any mode.",
        range=Range(0.0, low_open=True),
    )
    split_qkv: bool = _setting(
        True, "muon_split_qkv", "--muon-no-split-qkv",
        "Orthogonalize Q, K and V as three matrices; --muon-no-split-qkv orthogonalizes the fused QKV weight as one.",
        layout=True,
    )
    split_glu: bool = _setting(
        True, "muon_split_glu", "--muon-no-split-glu",
        "Orthogonalize a gated MLP's gate and up as two matrices; --muon-no-split-glu orthogonalizes the fused "
        "[gate; up] weight as one.",
        layout=True,
    )
    overlap_groups: int = _setting(
        1, "muon_overlap_groups", "--muon-overlap-groups",
        "Pipeline the distributed step in up to this many groups of same-shape stacks: while one group is "
        "orthogonalized, the next group's pieces travel and the previous group's updates return (asynchronous "
        "all-to-alls). 1: one exchange each way. The update is bit-identical for every value.",
        range=Range(1), runtime=True,
    )

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked(f, getattr(self, f.name)))
        self._check_schedule()

    def _check_schedule(self) -> None:
        """Refuse what orthogonalize would refuse at its first step, for every method this config may run."""
        for method in _METHODS_RUN[self.ns_method]:
            cannot = f"--muon-ns-precision {self.ns_precision} cannot run"
            try:
                schedule = precision_schedule(self.ns_precision, self.ns_steps, self.coefficients, method)
            except ValueError as err:
                # The split of a schedule without an explicit count depends on the coefficients and the method.
                context = (f" with --muon-coefficient-type {self.coefficients} --muon-ns-method {self.ns_method}"
                           if ">" in self.ns_precision else "")
                raise ValueError(f"--muon-ns-precision {self.ns_precision}{context} (ns_precision): {err}") from None
            try:
                check_fp8_coefficients(self.coefficients, schedule)
            except ValueError as err:
                raise ValueError(f"{cannot} --muon-coefficient-type {self.coefficients}: {err}") from None
            if method == "gram":
                try:
                    check_gram_precisions(self.coefficients, schedule)
                except ValueError as err:
                    raise ValueError(f"{cannot} --muon-ns-method {self.ns_method}: {err}") from None

    def check_device(self, device: torch.device | str) -> None:
        """Raise if `device` cannot run ns_precision (fp8 needs torch's float8 and an FP8 tensor-core GPU)."""
        try:
            check_precision(self.ns_precision, device)
        except RuntimeError as err:
            raise RuntimeError(f"--muon-ns-precision {self.ns_precision}: {err}") from None

    def update_options(self) -> dict:
        """The settings of the update itself (no layout ones): the single-device Muon's keywords."""
        return {name: getattr(self, name) for name in UPDATE_SETTINGS}


SETTINGS: dict[str, Setting] = {f.name: f.metadata["setting"] for f in dataclasses.fields(MuonConfig)}
UPDATE_SETTINGS: tuple[str, ...] = tuple(name for name, s in SETTINGS.items() if not (s.layout or s.runtime))


def _checked(f: dataclasses.Field, value):
    """`value` for field `f`, aliases resolved and ints widened to float where a float is due; else an error."""
    s: Setting = f.metadata["setting"]
    if f.type is bool:
        valid = isinstance(value, bool)
    elif f.type is int:
        valid = isinstance(value, int) and not isinstance(value, bool)
    elif f.type is float:
        valid = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        valid = isinstance(value, f.type)
    if not valid:
        raise TypeError(f"{s.flag} ({f.name}) must be of type {f.type.__name__}, got {value!r}")
    if f.type is float:
        value = float(value)
    if s.range is not None and value not in s.range:
        raise ValueError(f"{s.flag} {value} is out of range: {f.name} must be in {s.range}")
    if s.choices:
        value = s.aliases.get(value, value)
        if value not in s.choices:
            raise ValueError(f"{s.flag} {value!r} ({f.name}) is not one of {s.accepted}")
    return value

