"""The quintics p(x) = a x + b x^3 + c x^5 Newton-Schulz applies, one per iteration, by name.

Which polynomials decide how close to 1 the singular values end up after a given number of steps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

Coefficients = tuple[float, float, float]

# Keller Jordan's single quintic, tuned so that 5 steps lift tiny singular values fast while keeping all of
# them in roughly (0.7, 1.2). It never converges to exactly 1; the paper (arXiv 2505.02222, App. G) uses it.
_JORDAN: tuple[Coefficients, ...] = ((3.4445, -4.7750, 2.0315),)

# Five tuned quintics (modded-nanogpt `train_gpt_medium.py`, derivation by F. Cesista,
# https://leloykun.github.io/ponder/muon-opt-coeffs/); megatron-core's default `quintic` set. Cycled past 5 steps,
# as megatron-core does.
_QUINTIC: tuple[Coefficients, ...] = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)

# Polar Express (Amsel, Persson, Musco, Gower, arXiv 2505.16932, Algorithm 1): the minimax-optimal quintic for
# each step, for singular values in [1e-3, 1]. Every polynomial but the last is shrunk by a 1.01 safety factor
# (a / 1.01, b / 1.01^3, c / 1.01^5) so bf16 rounding cannot push a singular value past the stable region.
# The last one, (15 x - 10 x^3 + 3 x^5) / 8, is the classical degree-5 Newton-Schulz step, repeated after step 8.
_POLAR_EXPRESS_PUBLISHED: tuple[Coefficients, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)
_POLAR_EXPRESS: tuple[Coefficients, ...] = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS_PUBLISHED[:-1]
) + (_POLAR_EXPRESS_PUBLISHED[-1],)


@dataclass(frozen=True)
class CoefficientSet:
    polynomials: tuple[Coefficients, ...]
    past_the_end: Literal["cycle", "repeat_last"]


COEFFICIENT_SETS: dict[str, CoefficientSet] = {
    "jordan": CoefficientSet(_JORDAN, "cycle"),
    "quintic": CoefficientSet(_QUINTIC, "cycle"),
    "polar_express": CoefficientSet(_POLAR_EXPRESS, "repeat_last"),
}
# megatron-core calls the Jordan set `simple`; accepting its name lets one flag value mean one thing everywhere.
COEFFICIENT_ALIASES: dict[str, str] = {"simple": "jordan"}


def canonical_coefficients(name: str) -> str:
    """The registered name behind `name` (aliases resolved); ValueError naming the choices otherwise."""
    resolved = COEFFICIENT_ALIASES.get(name, name)
    if resolved not in COEFFICIENT_SETS:
        choices = sorted(COEFFICIENT_SETS) + sorted(COEFFICIENT_ALIASES)
        raise ValueError(f"unknown Newton-Schulz coefficient set {name!r}; choose one of {choices}")
    return resolved


def coefficient_schedule(name: str, steps: int) -> list[Coefficients]:
    """The (a, b, c) triple used at each of `steps` iterations."""
    if steps < 1:
        raise ValueError(f"Newton-Schulz needs at least one step, got steps={steps}")
    spec = COEFFICIENT_SETS[canonical_coefficients(name)]
    if spec.past_the_end == "cycle":
        return list(itertools.islice(itertools.cycle(spec.polynomials), steps))
    tail = [spec.polynomials[-1]] * max(0, steps - len(spec.polynomials))
    return list(spec.polynomials[:steps]) + tail
