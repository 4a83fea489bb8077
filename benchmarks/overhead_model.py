"""How much of a training step Muon's optimizer step costs: the registry's 3.67b (the paper's) and 4b models,
1M-16M-token batches, 8-1024 H100s, from the orthogonalization plan's per-rank FLOPs and bytes.

A cost model, not a measurement: every row says which of its rates were measured and which are datasheet
numbers or assumptions. Conventions and the table: benchmarks/README.md ("Muon step overhead").
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from megatron_muon.models.registry import ModelConfig, get_model_config, parameter_count  # noqa: E402
from megatron_muon.models.shapes import logical_matrices  # noqa: E402
from megatron_muon.newton_schulz import orthogonalization_flops  # noqa: E402
from megatron_muon.plan import LogicalMatrix, plan_orthogonalization  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MODELS = (get_model_config("3.67b"), get_model_config("4b"))


@dataclass(frozen=True)
class Rates:
    """Per-GPU rates and where each comes from ("measured ..." or "datasheet ..." / "assumed ...")."""

    ns_tflops: float
    ns_source: str
    link_gbytes: float  # per direction, per GPU, between nodes
    link_source: str
    nvlink_gbytes: float  # per direction, per GPU, inside one 8-GPU node
    nvlink_source: str
    train_tflops: float  # achieved in forward + backward: peak x MFU
    train_source: str


H100_DATASHEET_BF16_TFLOPS = 989.0  # H100 SXM dense bf16
H100_DATASHEET_IB_GBYTES = 50.0  # one 400 Gb/s NDR InfiniBand port per GPU, per direction
H100_DATASHEET_NVLINK_GBYTES = 450.0  # 900 GB/s NVLink 4, half per direction
GPUS_PER_NODE = 8
ASSUMED_MFU = 0.40
ASSUMED_NS_EFFICIENCY = 0.5  # fraction of peak our bf16 NS reached on the H100 (400-540 TFLOP/s on paper shapes)


def h100_rates(measured_json: pathlib.Path = RESULTS / "orthogonalize-h100.json") -> Rates:
    """NS rate from the H100 benchmark run if its results exist (FLOP-weighted over the paper's single
    matrices, ours, bf16, jordan), else half the datasheet peak; link and training rates from the datasheet."""
    ns_tflops = ASSUMED_NS_EFFICIENCY * H100_DATASHEET_BF16_TFLOPS
    ns_source = f"assumed {ASSUMED_NS_EFFICIENCY:.0%} of the {H100_DATASHEET_BF16_TFLOPS:.0f} TFLOP/s bf16 datasheet peak"
    if measured_json.exists():
        data = json.loads(measured_json.read_text())
        rows = [r for r in data["rows"] if r["method"] == "megatron_muon" and r["precision"] == "bf16"
                and r["coefficients"] == "jordan" and r["batch"] == 1 and r["rows"] >= 1024 and r["ms"]]
        if rows:
            ns_tflops = sum(r["gflop"] for r in rows) / sum(r["ms"] for r in rows)
            ns_source = f"measured, {data['metadata']['device']} {data['metadata']['timestamp'][:10]} (bf16 NS)"
    return Rates(ns_tflops, ns_source, H100_DATASHEET_IB_GBYTES, "datasheet 400 Gb/s IB per GPU",
                 H100_DATASHEET_NVLINK_GBYTES, "datasheet NVLink 4",
                 ASSUMED_MFU * H100_DATASHEET_BF16_TFLOPS, f"assumed {ASSUMED_MFU:.0%} MFU of the bf16 datasheet peak")


@dataclass(frozen=True)
class Overhead:
    model: str
    batch_tokens: int
    gpus: int
    method: str
    train_ms: float
    ns_ms: float
    exchange_ms: float
    muon_share: float  # (ns + exchange) / (train + ns + exchange)
    ns_flops_max_rank: int
    exchange_bytes_max_rank: int
    imbalance: float
    basis: str


def train_flops(model: ModelConfig, tokens: int) -> float:
    """Forward + backward: 6 per parameter and token, plus causal attention's 12 L d_attn seq per token (the
    score and value products, counted in full as Megatron's MFU does); the embedding lookup is free, the tied head
    is not (its GEMM is in 6 N through the embedding's parameters). N is the registry's count, norms included
    (6 FLOP per norm weight overstates their cost; they are 0.005% of N)."""
    s = model.shape
    attention = 12 * s.num_layers * s.num_attention_heads * s.head_dim * s.seq_length
    return tokens * (6 * parameter_count(s) + attention)


def muon_overhead(model: ModelConfig, batch_tokens: int, gpus: int, rates: Rates, method: str = "standard",
                  ns_steps: int = 5, coefficients: str = "jordan", wire_bytes: int = 2) -> Overhead:
    """One optimizer step against one training step, data parallel over `gpus` with DP-sharded Muon state.

    Every matrix is spread evenly over all ranks; the plan gives each one home rank (LPT on standard NS FLOPs),
    the home runs NS with `method`, and the exchange (pieces in, results out, `wire_bytes` per element) runs at
    the NVLink rate within one node and at the inter-node link rate beyond (almost all of an all-to-all's bytes
    then leave the node), while the slowest rank's NS runs at the NS rate. Nothing is overlapped: an upper
    estimate of Muon's share.
    """
    shapes = logical_matrices(model.shape)
    logical = [LogicalMatrix.sharded(n, r, c, range(gpus)) for n, (r, c) in shapes.items()]
    plan = plan_orthogonalization(logical, gpus, ns_steps, bytes_per_element=wire_bytes)
    per_rank = [0] * gpus
    for name, home in plan.home.items():
        per_rank[home] += orthogonalization_flops(*shapes[name], ns_steps, coefficients, method)
    ns_ms = max(per_rank) / (rates.ns_tflops * 1e9)
    link = rates.nvlink_gbytes if gpus <= GPUS_PER_NODE else rates.link_gbytes
    exchange_ms = max(plan.bytes_sent) / (link * 1e6)
    train_ms = train_flops(model, batch_tokens) / gpus / (rates.train_tflops * 1e9)
    muon_ms = ns_ms + exchange_ms
    return Overhead(model.name, batch_tokens, gpus, method, train_ms, ns_ms, exchange_ms, muon_ms / (train_ms + muon_ms),
                    max(per_rank), max(plan.bytes_sent), max(per_rank) * gpus / sum(per_rank),
                    f"NS: {rates.ns_source}; link: {rates.nvlink_source if gpus <= GPUS_PER_NODE else rates.link_source}; "
                    f"training: {rates.train_source}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpus", type=int, nargs="+", default=[8, 32, 128, 512, 1024])
    p.add_argument("--batch-mtokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--methods", nargs="+", default=["standard", "auto"], choices=["standard", "gram", "auto"])
    p.add_argument("--json", type=pathlib.Path, default=RESULTS / "overhead_model.json")
    args = p.parse_args()
    rates = h100_rates()
    print(f"rates: NS {rates.ns_tflops:.0f} TFLOP/s ({rates.ns_source}); link {rates.link_gbytes:.0f} GB/s "
          f"({rates.link_source}); training {rates.train_tflops:.0f} TFLOP/s ({rates.train_source})")
    rows = []
    header = f"{'model':14} {'batch':>6} {'GPUs':>5} {'method':>8} {'train ms':>9} {'NS ms':>7} {'xchg ms':>8} {'Muon %':>7}"
    print(header)
    for model in MODELS:
        for mtokens in args.batch_mtokens:
            tokens = mtokens * 2**20
            for gpus in args.gpus:
                if tokens < gpus * model.shape.seq_length:  # fewer sequences than GPUs: not a data-parallel layout
                    continue
                for method in args.methods:
                    o = muon_overhead(model, tokens, gpus, rates, method)
                    rows.append(asdict(o))
                    print(f"{model.name:14} {mtokens:>5}M {gpus:>5} {method:>8} {o.train_ms:>9.1f} {o.ns_ms:>7.2f} "
                          f"{o.exchange_ms:>8.2f} {100 * o.muon_share:>6.2f}%")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(status="projected (cost model; see basis per row)", rates=asdict(rates),
                models=[dict(name=m.name, **asdict(m.shape), params=m.parameter_count()) for m in MODELS])
    args.json.write_text(json.dumps(dict(metadata=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
