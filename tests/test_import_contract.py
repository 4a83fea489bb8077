"""The package's import contract, read from the source (every import counts, lazy ones inside functions too):

1. floors import only downward. Each module of megatron_muon/ has a floor in `FLOORS`; it may import modules of
   its own floor or below and the outside packages its floor allows (`ALLOWED`):
     1 math and pure data: the standard library, torch (not torch.distributed) and numpy (study/metrics.py fits
       curves with it), so it runs and tests in milliseconds anywhere; also Transformer Engine, imported lazily
       by newton_schulz/precision.py as a GEMM kernel backend on GPUs (no communication, no Megatron);
     2 runtime: adds torch.distributed (the collectives of the distributed optimizer, the CPU rank harness);
     3 integration: adds megatron; everything that depends on Megatron's internals lives here;
     4 tools: entry points, the data pipeline, sweeps and studies; anything below and any outside package.
2. only megatron_muon/integration/ and the Megatron training scripts (`MEGATRON_IMPORTERS`) import megatron,
   in the package and in examples/ and benchmarks/, so a megatron-core upgrade is one package to re-check;
3. floor 1 never touches torch.distributed, not even as an attribute of torch;
4. every module of the package has a floor: a new module is placed deliberately.

`violations(module, source)` applies the rules to one file; the tests below run it on every file, and on
synthetic sources that break each rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "megatron_muon"
MATH, RUNTIME, INTEGRATION, TOOLS = 1, 2, 3, 4

# Module -> floor; "X.*" places the package X and everything under it, an exact name overrides it.
FLOORS = {
    "megatron_muon.muon_config": MATH,
    "megatron_muon.newton_schulz.*": MATH,
    "megatron_muon.muon": MATH,
    "megatron_muon.plan": MATH,
    "megatron_muon.pieces": MATH,
    "megatron_muon.mup.rules": MATH,
    "megatron_muon.models.*": MATH,
    "megatron_muon.sweep.telescope": MATH,
    "megatron_muon.study.metrics": MATH,
    "megatron_muon.runtime.*": RUNTIME,
    "megatron_muon.testing.*": RUNTIME,
    "megatron_muon.integration.*": INTEGRATION,
    "megatron_muon": TOOLS,  # the package's front door: re-exports and install()
    "megatron_muon.data.*": TOOLS,
    "megatron_muon.train": TOOLS,
    "megatron_muon.launch": TOOLS,
    "megatron_muon.cluster": TOOLS,
    "megatron_muon.sweep.*": TOOLS,
    "megatron_muon.study.*": TOOLS,
    "megatron_muon.mup": TOOLS,
    "megatron_muon.mup.coord_check": TOOLS,
    "megatron_muon.mup.__main__": TOOLS,
}
ALLOWED = {
    MATH: {"stdlib", "torch", "numpy", "transformer_engine"},
    RUNTIME: {"stdlib", "torch", "numpy", "transformer_engine", "torch.distributed"},
    INTEGRATION: {"stdlib", "torch", "numpy", "transformer_engine", "torch.distributed", "megatron"},
    TOOLS: {"stdlib", "torch", "numpy", "transformer_engine", "torch.distributed", "megatron", "other"},
}
MEGATRON_IMPORTERS = (
    "megatron_muon.integration.*",
    "megatron_muon.train",
    "megatron_muon.launch",
    # A user's unmodified Megatron-LM script (it stands in for pretrain_gpt.py and must not know the plugin).
    "examples.pretrain_gpt_cpu",
)
SCANNED = (PACKAGE, "examples", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for top in SCANNED for p in sorted((REPO / top).rglob("*.py"))}
PACKAGE_MODULES = frozenset(m for m in FILES if m.split(".")[0] == PACKAGE)


def _matches(pattern: str, module: str) -> bool:
    if pattern.endswith(".*"):
        return module == pattern[:-2] or module.startswith(pattern[:-1])
    return module == pattern


def floor_of(module: str) -> int | None:
    if module in FLOORS:
        return FLOORS[module]
    packages = [p for p in FLOORS if p.endswith(".*") and _matches(p, module)]
    return FLOORS[max(packages, key=len)] if packages else None


def kind(target: str) -> str:
    """What an imported name belongs to: this package, one of the outside packages the floors name, or other."""
    top = target.split(".")[0]
    if top == PACKAGE:
        return "package"
    if target == "torch.distributed" or target.startswith("torch.distributed."):
        return "torch.distributed"
    if top in ("torch", "numpy", "megatron"):
        return top
    if top in ("transformer_engine", "transformer_engine_torch"):  # TE's Python package and its C++ extension
        return "transformer_engine"
    return "stdlib" if top in sys.stdlib_module_names else "other"


def imports(module: str, source: str) -> list[tuple[int, str]]:
    """(line, dotted name) of everything the source imports: `import a.b`, `from a import b` (as a.b),
    relative imports resolved, `importlib.import_module` / `__import__` of a literal, and torch.distributed
    reached as an attribute of an imported torch."""
    tree = ast.parse(source)
    is_package = module in PACKAGE_MODULES and FILES[module].name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    torch_names = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, alias.name))
                if alias.name == "torch":
                    torch_names.add(alias.asname or "torch")
                elif alias.name.startswith("torch.") and alias.asname is None:
                    torch_names.add("torch")  # `import torch.nn` binds torch
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*here[: len(here) - node.level + 1], *([base] if base else [])])
            found += [(node.lineno, base if alias.name == "*" else f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
                and node.value.id in torch_names):
            found.append((node.lineno, "torch.distributed"))
    return found


def resolve(target: str) -> str:
    """The package module a `from`-import names: `a.b.name` is module a.b unless a.b.name is a module itself."""
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in PACKAGE_MODULES:
            return ".".join(parts[:end])
    return target


def violations(module: str, source: str) -> list[str]:
    """Every break of the contract in `source`, the text of `module` (a dotted name as `module_name` gives)."""
    found = []
    in_package = module.split(".")[0] == PACKAGE
    floor = floor_of(module) if in_package else None
    if in_package and floor is None:
        found.append(f"{module}: rule 4: no floor in FLOORS; place the new module deliberately")
    for line, target in imports(module, source):
        what = kind(target)
        where = f"{module}:{line}"
        if what == "megatron" and not any(_matches(p, module) for p in MEGATRON_IMPORTERS):
            found.append(f"{where}: rule 2: imports {target}; only integration/ and the training scripts may")
        if floor is None:
            continue
        if what == "package":
            other = resolve(target)
            other_floor = floor_of(other)
            if other_floor is not None and other_floor > floor:
                found.append(f"{where}: rule 1: floor {floor} imports {other} (floor {other_floor})")
        elif what == "torch.distributed" and floor == MATH:
            found.append(f"{where}: rule 3: floor 1 uses {target}")
        elif what not in ALLOWED[floor]:
            found.append(f"{where}: rule 1: floor {floor} imports {target} ({what}: floor {floor} allows "
                         f"{', '.join(sorted(ALLOWED[floor]))})")
    return found


def test_the_scan_sees_the_package_examples_and_benchmarks():
    assert {"megatron_muon", "megatron_muon.integration", "megatron_muon.models.registry"} <= PACKAGE_MODULES
    assert "examples.quickstart" in FILES and "benchmarks.overhead_model" in FILES


@pytest.mark.parametrize("module", sorted(FILES))
def test_module_keeps_the_import_contract(module):
    found = violations(module, FILES[module].read_text())
    assert not found, "\n".join(found)


# Each rule broken on purpose, by a module that exists in the table, once at the top and once lazily.
@pytest.mark.parametrize(
    "module, source, rule",
    [
        ("megatron_muon.plan", "from megatron_muon.integration import layouts\n", "rule 1: floor 1 imports "
         "megatron_muon.integration.layouts (floor 3)"),
        ("megatron_muon.runtime.exchange", "def f():\n    from megatron_muon.data.corpus import build_dataset\n",
         "rule 1: floor 2 imports megatron_muon.data.corpus (floor 4)"),
        ("megatron_muon.models.shapes", "import sentencepiece\n", "rule 1: floor 1 imports sentencepiece (other"),
        ("megatron_muon.runtime.exchange", "import megatron.core\n", "rule 1: floor 2 imports megatron.core"),
        ("megatron_muon.sweep.trial", "def f():\n    from megatron.core import parallel_state\n",
         "rule 2: imports megatron.core.parallel_state"),
        ("megatron_muon.data.corpus", "import importlib\nimportlib.import_module('megatron.core.datasets')\n",
         "rule 2: imports megatron.core.datasets"),
        ("examples.quickstart", "def f():\n    import megatron.training\n", "rule 2: imports megatron.training"),
        ("megatron_muon.muon", "import torch.distributed as dist\n", "rule 3: floor 1 uses torch.distributed"),
        ("megatron_muon.muon", "from torch import distributed\n", "rule 3: floor 1 uses torch.distributed"),
        ("megatron_muon.muon", "import torch\ndef f():\n    return torch.distributed.get_rank()\n",
         "rule 3: floor 1 uses torch.distributed"),
        ("megatron_muon.brand_new", "import torch\n", "rule 4: no floor in FLOORS"),
    ],
)
def test_each_rule_catches_its_break(module, source, rule):
    assert any(rule in v for v in violations(module, source)), violations(module, source)


@pytest.mark.parametrize(
    "module, source",
    [
        ("megatron_muon.integration.gpt", "def f():\n    from megatron.core import parallel_state\n"),
        ("megatron_muon.train", "from megatron.training import pretrain\nimport rich\n"),
        ("megatron_muon.runtime.exchange", "import torch.distributed as dist\nfrom megatron_muon import pieces\n"),
        ("megatron_muon.study.metrics", "from __future__ import annotations\nimport numpy as np\n"),
        ("megatron_muon.sweep.runner", "from megatron_muon.sweep.telescope import plan_stages\n"),
        ("megatron_muon.sweep.telescope", "import math\nfrom megatron_muon.models.shapes import GPTShape\n"),
        ("megatron_muon.muon", "import torch\nx = torch.nn.Linear(2, 2)\n"),
    ],
)
def test_what_the_contract_allows_passes(module, source):
    assert violations(module, source) == []


def test_relative_imports_resolve_to_their_package():
    assert violations("megatron_muon.models.registry", "from ..integration import gpt\n") == [
        "megatron_muon.models.registry:1: rule 1: floor 1 imports megatron_muon.integration.gpt (floor 3)"]
    assert violations("megatron_muon.models", "from .shapes import GPTShape\nfrom . import registry\n") == []
