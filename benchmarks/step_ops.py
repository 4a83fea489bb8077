"""How many ops one `optimizer.step()` dispatches, and how many of them force a host synchronization.

On a GPU a non-view aten op of an optimizer step is about one kernel launch (a `_foreach_*` op is one per chunk of
its tensors), and a step of thousands of small kernels is bound by launches, not FLOPs. Counted here on CPU, where
the dispatcher sees the same ops: a `TorchDispatchMode` records every op dispatched inside one `optimizer.step()`
of a tiny GQA + SwiGLU GPT (`models.shapes.TINY`: hidden 64, 4 query heads, 2 KV heads, FFN 128) in bf16, one
gloo rank, Megatron's distributed optimizer (DP-sharded state), after one warm-up step (so lazy state creation is
not counted), at two depths. The mode sees the ops Python and composite ops dispatch, not those a kernel calls
internally. The growth per layer is what the step costs per transformer layer; the totals include what does not
grow (embeddings, the output head, the final norm, Newton-Schulz per stack of same-shape matrices, bookkeeping).

Rows: ours (`muon`; `muon_overlap`: pipelined in up to 4 groups, `--muon-overlap-groups 4`), NVIDIA's Muon (`nvidia_muon`: megatron-core's layer-wise distributed optimizer, which
megatron.training builds for its Muon when given `--use-distributed-optimizer`, in megatron.training's default TP
mode, `blockwise`, unless `--nvidia-tp-mode` says otherwise), Megatron's AdamW
(`adam`, torch's Adam inside Megatron's `DistributedOptimizer`), and each wrapper with its inner optimizer's
`step()` replaced by a no-op: what Megatron's wrapper dispatches around the inner step (grad copies, found-inf
check, grad norm, clipping, main-to-model copies, param all-gather), so a row minus its wrapper row is the inner
optimizer's own share (for `muon`, the plugin's).

Host synchronizations (HOST_SYNC_OPS): an op counts when on a GPU the host must wait for the device to finish
before it can continue: it reads a device value on the host (`_local_scalar_dense`: `.item()`, `bool()`,
`float()` of a tensor; `is_nonzero`; `equal`), or its output shape depends on device data (`nonzero`,
`masked_select`, the `unique` family, `repeat_interleave` of a tensor of repeats without `output_size`), or a
boolean-mask index (`index` / `index_put_` with a bool index: a hidden `nonzero`). On CPU every tensor is a host
tensor, so the rule also counts reads a GPU run would make from host tensors (torch's Adam reads its CPU `step`
tensors with `.item()`), and misses device-to-host copies (`.cpu()` is a no-op here). Collectives (`c10d.*` ops)
are counted apart from aten ops.

    python benchmarks/step_ops.py                         # layers 2 and 8, every row; ~1 min on CPU
    python benchmarks/step_ops.py --rows muon --layers 2 4 --out /tmp/step_ops.json
    python benchmarks/step_ops.py --rows nvidia_muon "nvidia_muon wrapper" --nvidia-tp-mode duplicated
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from megatron_muon.models.shapes import TINY, GPTShape  # noqa: E402  (no megatron import)

# Every optimizer row and, per optimizer, the same row with a no-op inner step.
OPTIMIZERS = ("muon", "nvidia_muon", "adam")
# Ours with the step pipelined in up to OVERLAP_GROUPS groups (--muon-overlap-groups): what pipelining adds.
OVERLAP_GROUPS = 4
ROWS = OPTIMIZERS + tuple(f"{name} wrapper" for name in OPTIMIZERS) + ("muon_overlap",)
DEFAULT_LAYERS = (2, 8)
TOP_KINDS = 12

HOST_SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.nonzero", "aten.masked_select",
    "aten._unique", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive", "aten.unique_dim_consecutive",
})
# Data-dependent only with some arguments: repeats (a tensor: the only overload that reaches the dispatcher) without
# `output_size`; a bool mask as index.
_TENSOR_REPEATS = "aten.repeat_interleave"
_MASK_INDEXING = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})


def _is_host_sync(name: str, args, kwargs) -> bool:
    if name in HOST_SYNC_OPS:
        return True
    if name == _TENSOR_REPEATS:
        return kwargs.get("output_size") is None
    if name in _MASK_INDEXING and len(args) > 1:
        return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ())
    return False


class OpCounter(TorchDispatchMode):
    """Counts every op dispatched while active, by overload packet (`aten.mul_`), and the host syncs among them."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views = 0
        self.host_syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = f"{func.namespace}.{func.overloadpacket.__name__}"
        self.ops[name] += 1
        # A view launches no kernel on a GPU; counted, but also reported apart.
        self.views += bool(func.is_view)
        if _is_host_sync(name, args, kwargs):
            self.host_syncs[name] += 1
        return func(*args, **kwargs)

    def summary(self) -> dict:
        aten = {k: v for k, v in self.ops.items() if k.startswith("aten.")}
        return dict(
            aten_ops=sum(aten.values()),
            view_ops=self.views,
            collectives=sum(v for k, v in self.ops.items() if k.startswith("c10d.")),
            host_syncs=sum(self.host_syncs.values()),
            host_syncs_by_op=dict(self.host_syncs.most_common()),
            by_kind=dict(sorted(self.ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        )


def optimizer_config(name: str, nvidia_tp_mode: str = "blockwise"):
    from megatron_muon.integration.flags import MuonOptimizerConfig

    common = dict(lr=5e-3, weight_decay=0.1, bf16=True, clip_grad=1.0, adam_beta1=0.95, adam_beta2=0.95,
                  adam_eps=1e-8, muon_momentum=0.95, muon_nesterov=True, muon_num_ns_steps=5)
    if name == "nvidia_muon":
        # What megatron.training builds for `--optimizer muon --use-distributed-optimizer` without the plugin: the
        # layer-wise optimizer (whole matrices per DP rank).
        return MuonOptimizerConfig(optimizer="nvidia_muon", use_layer_wise_distributed_optimizer=True,
                                   muon_tp_mode=nvidia_tp_mode, **common)
    if name == "muon_overlap":
        return MuonOptimizerConfig(optimizer="muon", use_distributed_optimizer=True,
                                   muon_overlap_groups=OVERLAP_GROUPS, **common)
    return MuonOptimizerConfig(optimizer=name, use_distributed_optimizer=True, **common)


def _inner_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside Megatron's wrappers (a chain, or the layer-wise optimizer's nesting)."""
    found, stack = [], [optimizer]
    while stack:
        o = stack.pop()
        if hasattr(o, "chained_optimizers"):  # a chain's `optimizer` property asserts it holds exactly one
            stack += o.chained_optimizers
        elif isinstance(o.optimizer, torch.optim.Optimizer):
            found.append(o.optimizer)
        else:
            stack.append(o.optimizer)
    return found


def count_step(row: str, shape: GPTShape, nvidia_tp_mode: str = "blockwise") -> dict:
    """One rank's counts for `row` on `shape`: inside the second optimizer.step(), after one warm-up step."""
    from megatron_muon.integration.optimizer import step_stats
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, TrainingSetup, synthetic_batches

    name, _, wrapper_only = row.partition(" ")
    with model_parallel(seed=1234):
        trainer = Trainer(TrainingSetup(shape, optimizer_config(name, nvidia_tp_mode), torch.bfloat16, seed=1234))
        trainer.step(synthetic_batches(shape, 2, 1, seed=0))  # creates the optimizer state
        inner = _inner_optimizers(trainer.optimizer)
        if wrapper_only:
            for o in inner:
                o.step = lambda closure=None: None
            # The plugin's chain prepares every inner optimizer and agrees on the step itself (the plugin's work):
            # the wrapper row runs Megatron's own chain step around the no-op steps.
            chain = trainer.optimizer
            if type(chain).__module__.startswith("megatron_muon."):
                megatrons = next(vars(k)["step_with_ready_grads"] for k in type(chain).__mro__[1:]
                                 if "step_with_ready_grads" in vars(k))
                chain.step_with_ready_grads = megatrons.__get__(chain)
        trainer.forward_backward(synthetic_batches(shape, 2, 1, seed=1))
        trainer.finalize_grads()
        counter = OpCounter()
        with counter:
            applied = trainer.optimizer_step()
        if not applied:
            raise RuntimeError(f"{row}: the counted step was skipped (non-finite gradients)")
        # Memory beside the ops: the inner optimizers' state, and what ours keeps for its exchanges' indices.
        state_bytes = sum(t.numel() * t.element_size() for o in inner for state in o.state.values()
                          for t in state.values() if isinstance(t, torch.Tensor))
        index_bytes = sum(stats.index_bytes for stats in step_stats(trainer.optimizer))
        return counter.summary() | dict(state_bytes=state_bytes, index_bytes=index_bytes)


def _rank(rows: tuple[str, ...], layers: tuple[int, ...], shape: GPTShape, nvidia_tp_mode: str) -> dict:
    return {row: {n: count_step(row, dataclasses.replace(shape, num_layers=n), nvidia_tp_mode) for n in layers}
            for row in rows}


def measure(rows=ROWS, layers=DEFAULT_LAYERS, shape: GPTShape = TINY, nvidia_tp_mode: str = "blockwise") -> dict:
    """Counts per row and depth on one gloo rank (a fresh process), with each row's growth per layer."""
    from megatron_muon.testing.ranks import run_ranks

    if len(layers) < 2 or len(set(layers)) != len(layers):
        raise ValueError(f"need at least two different depths to measure growth per layer, got {layers}")
    [counts] = run_ranks(_rank, 1, (tuple(rows), tuple(layers), shape, nvidia_tp_mode), timeout=1800)
    lo, hi = min(layers), max(layers)
    result = dict(shape=dataclasses.asdict(shape), dtype="bf16", ranks=1, layers=list(layers),
                  nvidia_tp_mode=nvidia_tp_mode,
                  host_sync_rule=sorted(HOST_SYNC_OPS | {_TENSOR_REPEATS + " (tensor repeats)"}
                                        | {f"{op} (bool index)" for op in _MASK_INDEXING}),
                  rows={})
    for row, by_depth in counts.items():
        per_layer = (by_depth[hi]["aten_ops"] - by_depth[lo]["aten_ops"]) / (hi - lo)
        result["rows"][row] = dict(by_layers={str(n): c for n, c in by_depth.items()}, aten_ops_per_layer=per_layer)
    for name in (*OPTIMIZERS, "muon_overlap"):
        own, wrapper = result["rows"].get(name), result["rows"].get(f"{name.split('_overlap')[0]} wrapper")
        if own and wrapper:
            # The inner optimizer's own share: the row minus what its wrapper dispatches around a no-op step.
            own["inner_ops_per_layer"] = own["aten_ops_per_layer"] - wrapper["aten_ops_per_layer"]
            own["inner_ops"] = {n: own["by_layers"][n]["aten_ops"] - wrapper["by_layers"][n]["aten_ops"]
                                for n in own["by_layers"]}
    return result


def _table(title: str, header: list[str], cells: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
    lines = [title] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header] + cells]
    return "\n".join(lines)


def report(result: dict) -> str:
    layers = [str(n) for n in result["layers"]]
    hi = layers[-1]
    nvidia = result["rows"].get("nvidia_muon", {}).get("by_layers", {}).get(hi, {}).get("aten_ops")
    header = (["row"] + [f"ops @{n}L" for n in layers]
              + ["ops/layer", "inner ops/layer", f"inner ops @{hi}L", f"x nvidia @{hi}L", f"views @{hi}L",
                 f"c10d @{hi}L", f"host syncs @{hi}L", f"state KiB @{hi}L", f"index KiB @{hi}L"])
    cells = []
    for row, r in result["rows"].items():
        at = r["by_layers"]
        inner = r.get("inner_ops_per_layer")
        cells.append([row] + [str(at[n]["aten_ops"]) for n in layers] + [
            f"{r['aten_ops_per_layer']:.1f}", "-" if inner is None else f"{inner:.1f}",
            str(r["inner_ops"][hi]) if "inner_ops" in r else "-",
            f"{at[hi]['aten_ops'] / nvidia:.2f}" if nvidia else "-",
            str(at[hi]["view_ops"]), str(at[hi]["collectives"]), str(at[hi]["host_syncs"]),
            *(f"{at[hi][key] / 1024:.1f}" if key in at[hi] else "-" for key in ("state_bytes", "index_bytes")),
        ])
    shape = GPTShape(**result["shape"])
    parts = [_table(f"aten ops dispatched by one optimizer.step(): {shape}, bf16, 1 gloo rank, distributed optimizer "
                    f"(nvidia_muon: layer-wise, {result['nvidia_tp_mode']} TP mode)", header, cells)]
    for row, r in result["rows"].items():
        at = r["by_layers"][hi]
        kinds = list(at["by_kind"].items())[:TOP_KINDS]
        syncs = ", ".join(f"{k} x{v}" for k, v in at["host_syncs_by_op"].items()) or "none"
        parts.append(f"{row} @{hi}L, top ops: " + ", ".join(f"{k} {v}" for k, v in kinds) + f"; host syncs: {syncs}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW",
                   help=f"which rows to count (default all: {', '.join(ROWS)})")
    p.add_argument("--layers", nargs="+", type=int, default=list(DEFAULT_LAYERS), help="depths to count at")
    p.add_argument("--nvidia-tp-mode", choices=["blockwise", "duplicated", "distributed"], default="blockwise",
                   help="muon_tp_mode of the nvidia_muon rows (megatron.training's default: blockwise)")
    p.add_argument("--out", type=pathlib.Path, default=pathlib.Path("results/step_ops.json"))
    args = p.parse_args(argv)
    result = measure(tuple(args.rows), tuple(sorted(args.layers)), nvidia_tp_mode=args.nvidia_tp_mode)
    print(report(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
