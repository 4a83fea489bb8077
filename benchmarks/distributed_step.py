"""What one optimizer step costs a TP x DP group: bytes on the wire, Newton-Schulz FLOPs and their balance, time.

`--mode measure` trains a small megatron-core GPT on 4 gloo ranks (CPU), in every TP x DP layout, with our
distributed Muon, NVIDIA's Muon (megatron-core 0.19.2's layer-wise distributed optimizer, each `muon_tp_mode`) and
Megatron's distributed AdamW, and counts what each `optimizer.step()` does. `--mode simulate` runs the
orthogonalization planner for the paper's 3.67B model on 8 to 1024 ranks. Conventions: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import pathlib
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from megatron_muon.models.registry import BENCHMARK_SHAPES, get_model_config  # noqa: E402  (no megatron import)
from megatron_muon.models.shapes import GPTShape, logical_matrices  # noqa: E402
from megatron_muon.newton_schulz import newton_schulz_flops  # noqa: E402
from megatron_muon.plan import LogicalMatrix, plan_orthogonalization  # noqa: E402

SHAPE = BENCHMARK_SHAPES["distributed-step"]
PAPER = get_model_config("3.67b").shape
LAYOUTS = ((1, 4), (2, 2), (4, 1))
OPTIMIZERS = ("ours", "ours distopt", "nvidia blockwise", "nvidia duplicated", "nvidia distributed", "adamw distopt")
NS_STEPS = 5


def one_copy_flops(shape: GPTShape) -> int:
    return sum(newton_schulz_flops(r, c, NS_STEPS) for r, c in logical_matrices(shape).values())


# ---- counting: one convention for every collective, whoever calls it -------------------------------------------
# (sent, received) bytes of one call for rank `me` of a group of `p`. Payload moves straight from the rank holding
# it to each rank lacking it; a reduction sends each partial sum to the rank that owns that slice, all_reduce is
# reduce-scatter + all-gather. Bytes staying on the rank never count. For equal slices this is NCCL's ring traffic.
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _others(tensors, me: int) -> int:
    return sum(_nbytes(t) for i, t in enumerate(tensors) if i != me)


def _split(t: torch.Tensor, splits, p: int, me: int) -> int:
    if not splits:
        return _nbytes(t) * (p - 1) // p
    return _nbytes(t) // max(1, t.shape[0]) * sum(n for i, n in enumerate(splits) if i != me)


def _is_root(a: dict, me: int) -> bool:
    return a["group_src"] == me if a["src"] is None else a["src"] == dist.get_rank()


_COSTS = {
    "all_reduce": lambda a, p, me: (2 * (p - 1) * _nbytes(a["tensor"]) // p,) * 2,
    "all_gather": lambda a, p, me: ((p - 1) * _nbytes(a["tensor"]), _others(a["tensor_list"], me)),
    "all_gather_into_tensor": lambda a, p, me: (
        (p - 1) * _nbytes(a["input_tensor"]), _nbytes(a["output_tensor"]) - _nbytes(a["input_tensor"])),
    "reduce_scatter": lambda a, p, me: (_others(a["input_list"], me), (p - 1) * _nbytes(a["output"])),
    "reduce_scatter_tensor": lambda a, p, me: (
        _nbytes(a["input"]) - _nbytes(a["output"]), (p - 1) * _nbytes(a["output"])),
    "all_to_all_single": lambda a, p, me: (
        _split(a["input"], a["input_split_sizes"], p, me), _split(a["output"], a["output_split_sizes"], p, me)),
    "all_to_all": lambda a, p, me: (_others(a["input_tensor_list"], me), _others(a["output_tensor_list"], me)),
    "broadcast": lambda a, p, me: ((p - 1) * _nbytes(a["tensor"]), 0) if _is_root(a, me) else (0, _nbytes(a["tensor"])),
    "send": lambda a, p, me: (_nbytes(a["tensor"]), 0),
    "recv": lambda a, p, me: (0, _nbytes(a["tensor"])),
}
_COSTS |= dict(_all_gather_base=_COSTS["all_gather_into_tensor"], _reduce_scatter_base=_COSTS["reduce_scatter_tensor"],
               isend=_COSTS["send"], irecv=_COSTS["recv"])
_KIND = dict(all_reduce="AR", all_gather="AG", all_gather_into_tensor="AG", _all_gather_base="AG", reduce_scatter="RS",
             reduce_scatter_tensor="RS", _reduce_scatter_base="RS", all_to_all_single="A2A", all_to_all="A2A",
             broadcast="BC", send="P2P", recv="P2P", isend="P2P", irecv="P2P")
_counter: dict | None = None
_depth = 0  # a collective built from other public collectives counts once


def _counted(name: str, fn):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _depth
        if _counter is not None and _depth == 0:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            group = bound.arguments["group"]
            sent, received = _COSTS[name](bound.arguments, dist.get_world_size(group), dist.get_rank(group))
            _counter["sent"] += sent
            _counter["received"] += received
            _counter["sent_by_kind"][_KIND[name]] = _counter["sent_by_kind"].get(_KIND[name], 0) + sent
        _depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth -= 1

    return wrapper


def _install_counters() -> None:
    # DDP's grad reduce-scatter and param all-gather (start_param_sync) call functions its buffer module bound
    # when it was imported: patch torch.distributed before Megatron is, and they are counted too.
    if "megatron.core.distributed.param_and_grad_buffer" in sys.modules:
        raise RuntimeError("count collectives before megatron-core is imported, or DDP's grad sync goes uncounted")
    from emerging_optimizers.orthogonalized_optimizers import muon_utils

    for name in _COSTS:
        setattr(dist, name, _counted(name, getattr(dist, name)))

    newton_schulz = muon_utils.newton_schulz
    signature = inspect.signature(newton_schulz)

    def counted_newton_schulz(*args, **kwargs):
        if _counter is not None:
            a = signature.bind(*args, **kwargs).arguments
            x, steps, transpose = a["x"], a["steps"], a.get("transpose")
            rows, cols = x.shape[-2:]
            # newton_schulz_flops's formula, but on the Gram side it really uses: `distributed` TP mode forces the
            # unsharded side, which may be the larger one, and each rank runs the full Gram products on its shard.
            g, n = (cols, rows) if (rows > cols if transpose is None else transpose) else (rows, cols)
            _counter["ns_flops"] += x.numel() // (rows * cols) * steps * (4 * g * g * n + 2 * g**3)
        return newton_schulz(*args, **kwargs)

    # newton_schulz_tp calls this module global, so every TP mode goes through it.
    muon_utils.newton_schulz = counted_newton_schulz


@contextlib.contextmanager
def counting():
    global _counter
    _counter = dict(sent=0, received=0, sent_by_kind={}, ns_flops=0)
    try:
        yield _counter
    finally:
        _counter = None


# ---- measure: one process group per layout, every optimizer in turn -------------------------------------------
def _optimizer_config(name: str):
    from megatron_muon.integration.flags import MuonOptimizerConfig

    common = dict(
        lr=5e-3, weight_decay=0.1, bf16=True, clip_grad=1.0, adam_beta1=0.95, adam_beta2=0.95, adam_eps=1e-8,
        muon_momentum=0.95, muon_nesterov=True, muon_coefficient_type="simple", muon_scale_mode="spectral",
        muon_num_ns_steps=NS_STEPS, use_distributed_optimizer=name.endswith("distopt"),
    )
    # Both Muons run Newton-Schulz in bf16, each one's default (NVIDIA's "medium" casts the iterate to bf16).
    if name.startswith("ours"):
        return MuonOptimizerConfig(optimizer="muon", muon_ns_precision="bf16", **common)
    if name.startswith("nvidia"):
        # Megatron's own wiring for it: layer-wise, with shard-aligned DDP buffers, so grads are reduce-scattered
        # to whole-matrix owners.
        return MuonOptimizerConfig(optimizer="nvidia_muon", use_layer_wise_distributed_optimizer=True,
                                   muon_tp_mode=name.split()[-1], muon_fp32_matmul_prec="medium", **common)
    return MuonOptimizerConfig(optimizer="adam", **common)


def _run(name: str, tp: int, warmup: int, steps: int) -> dict:
    from megatron_muon.integration.optimizer import step_stats
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, TrainingSetup, synthetic_batches

    with model_parallel(tensor_parallel=tp, seed=1234):
        trainer = Trainer(TrainingSetup(SHAPE, _optimizer_config(name), torch.bfloat16))
        dp_rank, _ = trainer.data_parallel
        records = []
        for step in range(warmup + steps):
            trainer.forward_backward(synthetic_batches(SHAPE, 2, 1, 100 * step + dp_rank))
            with counting() as grad:
                trainer.finalize_grads()
            dist.barrier()  # time the step alone, not peers still in backward
            with counting() as opt:
                start = time.perf_counter()
                ok = trainer.optimizer_step()
                seconds = time.perf_counter() - start
            if not ok:
                raise RuntimeError(f"step {step} was skipped (non-finite gradients)")
            if name.startswith("ours"):
                opt["ns_flops"] = sum(stats.ns_flops for stats in step_stats(trainer.optimizer))
            if step >= warmup:
                records.append(dict(
                    step_sent=opt["sent"], step_received=opt["received"], step_by_kind=opt["sent_by_kind"],
                    ns_flops=opt["ns_flops"], grad_sent=grad["sent"], grad_received=grad["received"], seconds=seconds,
                ))
        return dict(optimizer=name, steps=records)


def _rank(tp: int, warmup: int, steps: int) -> list[dict]:
    _install_counters()
    out = []
    for name in OPTIMIZERS:
        try:
            out.append(_run(name, tp, warmup, steps))
        except Exception as e:  # one optimizer that cannot run here must not cost the others' rows
            out.append(dict(optimizer=name, error=f"{type(e).__name__}: {e}".splitlines()[0][:160]))
    return out


def _summary(tp: int, dp: int, per_rank: list[dict]) -> dict:
    row = dict(tp=tp, dp=dp, optimizer=per_rank[0]["optimizer"])
    errors = sorted({r["error"] for r in per_rank if "error" in r})
    if errors:
        return {**row, "error": " | ".join(errors)}
    keys = ("step_sent", "step_received", "grad_sent", "grad_received", "ns_flops")
    row |= {f"{k}_per_rank": [statistics.fmean(s[k] for s in r["steps"]) for r in per_rank] for k in keys}
    samples = [s for r in per_rank for s in r["steps"]]
    kinds = sorted({k for s in samples for k in s["step_by_kind"]})
    flops = row["ns_flops_per_rank"]
    times = zip(*([s["seconds"] for s in r["steps"]] for r in per_rank))
    return row | {
        "step_sent_by_kind": {k: statistics.fmean(s["step_by_kind"].get(k, 0) for s in samples) for k in kinds},
        "ns_copies": sum(flops) / one_copy_flops(SHAPE),
        "ns_max_over_mean": max(flops) / statistics.fmean(flops) if sum(flops) else None,
        "step_ms": 1e3 * statistics.median(max(t) for t in times),  # a step ends when its slowest rank does
    }


def measure(args) -> dict:
    from megatron_muon.testing.ranks import run_ranks

    rows = []
    for tp, dp in LAYOUTS:
        print(f"[TP {tp} x DP {dp}] {len(OPTIMIZERS)} optimizers ...", file=sys.stderr, flush=True)
        ranks = run_ranks(_rank, tp * dp, (tp, args.warmup, args.steps), timeout=900, collective_timeout=60)
        rows += [_summary(tp, dp, [r[i] for r in ranks]) for i in range(len(OPTIMIZERS))]

    def cell(r, key, spec, scale=1.0):
        v = r.get(key)
        return "-" if v is None else format((statistics.fmean(v) if isinstance(v, list) else v) / scale, spec)

    # Mean sent = mean received over the ranks of a group (every byte sent is received once), so one column.
    cells = [[f"{r['tp']}x{r['dp']}", r["optimizer"], cell(r, "step_sent_per_rank", ".1f", 1024),
              " ".join(f"{k} {v / 1024:.1f}" for k, v in r.get("step_sent_by_kind", {}).items()
                       if round(v / 1024, 1)),
              cell(r, "grad_sent_per_rank", ".1f", 1024), cell(r, "ns_copies", ".2f"),
              cell(r, "ns_max_over_mean", ".2f"), cell(r, "step_ms", ".1f"), r.get("error", "")[:70]] for r in rows]
    _print(f"{SHAPE} in bf16 on 4 gloo ranks (CPU), {args.steps} measured steps after {args.warmup}",
           ["TPxDP", "optimizer", "step KiB/rank", "of which", "grad sync KiB/rank", "NS / one copy",
            "NS max/mean", "step ms", "error"], cells)
    return dict(mode="measure", shape=SHAPE.__dict__, one_copy_flops=one_copy_flops(SHAPE), steps=args.steps,
                warmup=args.warmup, rows=rows)


# ---- simulate: the planner on the paper's model ---------------------------------------------------------------
def megatron_weights(shape: GPTShape) -> dict[str, tuple[int, int, int]]:
    """Weights as NVIDIA's layer-wise optimizer hands them out (fused QKV and fc1), each with the NS FLOPs its
    `duplicated` mode runs: Q, K and V apart (muon_split_qkv), gate and up as one fused matrix (no GLU split)."""
    h, f = shape.hidden_size, shape.ffn_hidden_size
    q, g = shape.num_attention_heads * shape.head_dim, shape.num_query_groups * shape.head_dim
    ns = functools.partial(newton_schulz_flops, steps=NS_STEPS)
    layer = dict(qkv=(q + 2 * g, h, ns(q, h) + 2 * ns(g, h)), proj=(h, q, ns(h, q)), fc1=(2 * f, h, ns(2 * f, h)),
                 fc2=(h, f, ns(h, f)))
    return {f"{i}.{name}": w for i in range(shape.num_layers) for name, w in layer.items()}


SIMULATE_COLUMNS = (
    ("ranks", "ranks", "d"), ("TP", "tp", "d"), ("DP", "dp", "d"),
    ("ours max/mean", "ours_imbalance", ".3f"), ("ours GFLOP", "ours_max_gflop", ".0f"), ("ours ms", "ours_ms", ".1f"),
    ("ours MB/rank", "ours_mb", ".0f"), ("elem max/mean", "elements_imbalance", ".3f"),
    ("elem GFLOP", "elements_max_gflop", ".0f"), ("nv-dup GFLOP", "duplicated_max_gflop", ".0f"),
    ("nv-dup ms", "duplicated_ms", ".1f"), ("nv-dup MB/rank", "duplicated_mb_fp32", ".0f"),
    ("param AG MB/rank", "param_all_gather_mb_bf16", ".0f"),
)


def simulate(args) -> dict:
    logical, weights = logical_matrices(PAPER), megatron_weights(PAPER)
    elements_total = sum(r * c for r, c in logical.values())
    rows = []
    for tp in (1, 2, 4, 8):
        for dp in (n // tp for n in (8, 16, 32, 64, 128, 256, 512, 1024)):
            n = tp * dp
            # Megatron numbers ranks TP-fastest (rank = dp_rank * TP + tp_rank); each TP shard split evenly over the
            # DP ranks leaves every rank 1/n of every matrix, wherever it sits in that order.
            matrices = [LogicalMatrix.sharded(k, r, c, range(n)) for k, (r, c) in logical.items()]
            ours, elements = (
                plan_orthogonalization(matrices, n, NS_STEPS, bytes_per_element=args.wire_bytes, balance=balance)
                for balance in ("flops", "elements")
            )
            # NVIDIA's layer-wise: whole weights to DP ranks by element count; in `duplicated` mode all TP ranks of
            # that DP rank run every one of them in full after a TP all-gather of the fp32 momentum.
            layerwise = plan_orthogonalization(
                [LogicalMatrix.sharded(k, r, c, range(dp)) for k, (r, c, _) in weights.items()], dp, NS_STEPS,
                balance="elements")
            dup = [sum(weights[k][2] for k, home in layerwise.home.items() if home == d) for d in range(dp)]
            rows.append(dict(
                ranks=n, tp=tp, dp=dp, ours_imbalance=ours.imbalance, ours_max_gflop=ours.max_flops / 1e9,
                ours_ms=ours.max_flops / args.tflops / 1e9, ours_mb=statistics.fmean(ours.bytes_sent) / 1e6,
                elements_imbalance=elements.imbalance, elements_max_gflop=elements.max_flops / 1e9,
                duplicated_max_gflop=max(dup) / 1e9, duplicated_ms=max(dup) / args.tflops / 1e9,
                duplicated_mb_fp32=(tp - 1) / tp * elements_total / dp * 4 / 1e6,
                # Every DP-sharded optimizer (ours with distopt, NVIDIA's layer-wise, AdamW) all-gathers the weights.
                param_all_gather_mb_bf16=(dp - 1) / dp * elements_total / tp * 2 / 1e6,
            ))
    _print(f"paper 3.67B: {PAPER.num_layers} layers, {len(logical)} matrices, {one_copy_flops(PAPER) / 1e12:.0f} TFLOP "
           f"for one NS of each ({NS_STEPS} steps); ms at {args.tflops:g} TFLOP/s; MB sent per rank and step "
           f"(ours: {args.wire_bytes} B per element)",
           [h for h, _, _ in SIMULATE_COLUMNS], [[format(r[k], f) for _, k, f in SIMULATE_COLUMNS] for r in rows])
    return dict(mode="simulate", model=PAPER.__dict__, ns_steps=NS_STEPS, tflops=args.tflops,
                wire_bytes_per_element=args.wire_bytes, one_copy_flops=one_copy_flops(PAPER), rows=rows)


def _print(title: str, header: list[str], cells: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
        print(title)
        for row in [header] + cells:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        return
    table = Table(title=title, title_justify="left")
    for name in header:
        table.add_column(name)
    for row in cells:
        table.add_row(*row)
    Console(width=max(200, Console().width)).print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", choices=["measure", "simulate"], default="measure")
    p.add_argument("--steps", type=int, default=5, help="measured steps per optimizer (measure)")
    p.add_argument("--warmup", type=int, default=2, help="steps before measuring (measure)")
    p.add_argument("--tflops", type=float, default=400.0,
                   help="NS throughput per rank for time estimates (simulate; bf16 on an H100, benchmarks/README.md)")
    p.add_argument("--wire-bytes", type=int, choices=(2, 4), default=2,
                   help="bytes per element of our exchange (simulate): 2 = bf16, sent unless NS runs in fp32")
    p.add_argument("--json", type=pathlib.Path,
                   help="default: results/distributed_step.json (-simulate.json with --mode simulate)")
    args = p.parse_args()
    result = measure(args) if args.mode == "measure" else simulate(args)
    path = args.json or pathlib.Path(f"results/distributed_step{'' if args.mode == 'measure' else '-simulate'}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
