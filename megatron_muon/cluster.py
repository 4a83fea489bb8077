"""Plan and launch a multi-node run of a named model: parallel layout, memory estimate, torchrun command.

    python -m megatron_muon.cluster --model 4b --optimizer muon --nodes 16 --batch-tokens 8M --lr 3e-3 --dry-run

prints the layout, tokens per step, a per-GPU memory estimate and the resolved torchrun command, and launches
nothing; without --dry-run it replaces itself with that torchrun (one call per node: the SLURM scripts under
launch/ run it through srun). The command trains `python -m megatron_muon.train`; everything after `--` is
passed to it unchanged (and wins over the planned flags, as argparse keeps the last value).

Layout rule (`choose_layout`): tensor parallelism stays inside a node (TP in 1, 2, 4, 8, dividing the query
and KV head counts); pipeline stages split the layers evenly; DP is what is left of the GPUs. Among the layouts
where DP x micro-batch divides the global batch and the memory estimate fits the budget, the smallest model
parallelism TP x PP wins (DP-only is what the paper ran, and each step of TP or PP costs communication or
pipeline bubbles), and at equal TP x PP the larger TP (no bubble, NVLink traffic). Fixing --tensor-parallel or
--pipeline-parallel restricts the search to it. No fitting layout is an error that says, per candidate, why.

Memory estimate (`estimate_memory`), per GPU of the most loaded pipeline stage, bf16 training with fp32 main
grads and Megatron's distributed optimizer:
    weights      2 B x stage params / TP
    main grads   4 B x stage params / TP
    optimizer    (4 B fp32 main params + 8 B AdamW moments, or 4 B Muon momentum on Muon matrices) / (TP x DP)
    Muon work    Newton-Schulz buffers on each home rank (fp32 input and 3 bf16 iterates of its matrices)
    activations  bf16 tensors kept for backward, flash attention (no seq^2 term), no dropout masks, sequence
                 parallel when TP > 1: (7 h + 3 h_kv + 3 d_mlp) x 2 B per token per layer / TP, for the
                 first stage's min(PP, micro-batches per step) micro-batches in flight (1F1B) through its
                 L / PP layers: all L layers of one micro-batch once a step has PP micro-batches
    logits       bf16 logits and their fp32 softmax: 6 B x tokens x vocab / TP on the last stage
It is an estimate for choosing a layout (no allocator fragmentation, NCCL or CUDA-context terms: those are the
budget's headroom), not a measurement.
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from dataclasses import dataclass

from megatron_muon.models.registry import MODEL_CONFIGS, ModelConfig, get_model_config, parameter_count
from megatron_muon.models.shapes import matrix_shapes

GPUS_PER_NODE = 8
H100_MEMORY_GIB = 79.6  # what an H100 80GB reports
MEMORY_BUDGET_FRACTION = 0.85  # headroom for the CUDA context, NCCL buffers, allocator fragmentation
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
TOKEN_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30}  # the paper's "8M tokens" is 2^23
# Training lengths the paper gives: Sec. 2 trains its "4B" on 50B tokens; Sec. 3.4 trains the width family
# 20,000 steps of 2^23 tokens.
PAPER_TRAIN_TOKENS = {"4b": 50 * 10**9, "3.67b": 20_000 * 2**23}
GIB = 2**30


class LayoutError(ValueError):
    """No parallel layout satisfies the request; the message lists why for each candidate."""


@dataclass(frozen=True)
class Layout:
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    micro_batch_size: int
    global_batch_size: int  # sequences per optimizer step

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches each DP rank runs per step (gradient accumulation)."""
        return self.global_batch_size // (self.data_parallel * self.micro_batch_size)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU of the most loaded pipeline stage."""

    weights: float
    grads: float
    optimizer: float
    muon_workspace: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.muon_workspace + self.activations + self.logits

    def table(self) -> str:
        parts = ["weights", "grads", "optimizer", "muon_workspace", "activations", "logits", "total"]
        return ", ".join(f"{name} {getattr(self, name) / GIB:.1f}" for name in parts) + " GiB"


def parse_tokens(text: str) -> int:
    """'8M' -> 8 x 2^20; plain integers are tokens."""
    text = text.strip().upper()
    scale = TOKEN_UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in TOKEN_UNITS else text
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"not a token count: {text!r} (e.g. 8M, 1.5M, 4194304)") from None
    if value <= 0 or value != int(value):
        raise ValueError(f"not a whole positive token count: {text!r}")
    return int(value)


def estimate_memory(config: ModelConfig, layout: Layout, optimizer: str) -> MemoryEstimate:
    s = config.shape
    tp, pp, dp = layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel
    layer_params = (parameter_count(s) - s.hidden_size - s.vocab_size * s.hidden_size) / s.num_layers
    embedding = s.vocab_size * s.hidden_size
    # With PP > 1 the first stage holds the embedding and the last a tied copy of it; with PP = 1 one copy.
    stage_params = (s.num_layers / pp * layer_params + embedding) / tp
    matrices = matrix_shapes(s)
    stage_muon_params = sum(m.rows * m.cols * m.count for m in matrices) / pp
    if optimizer == "muon":
        muon_params = stage_muon_params / tp
        state_bytes = 4 * stage_params + 4 * muon_params + 8 * (stage_params - muon_params)
        largest_matrix = max(m.rows * m.cols for m in matrices)
        # Each logical matrix is orthogonalized whole on one home rank of the stage's TP x DP group.
        homed = max(largest_matrix, stage_muon_params / (tp * dp))
        muon_workspace = (4 + 3 * 2) * homed
    else:
        state_bytes = 12 * stage_params
        muon_workspace = 0.0
    tokens = layout.micro_batch_size * s.seq_length
    # 1F1B: the first stage holds the activations of up to PP micro-batches, each through its L / PP layers.
    in_flight = min(pp, layout.micro_batches_per_step)
    kv_width = s.num_query_groups * s.head_dim
    per_token_layer = 2 * (7 * s.hidden_size + 3 * kv_width + 3 * s.ffn_hidden_size)
    return MemoryEstimate(
        weights=2 * stage_params,
        grads=4 * stage_params,
        optimizer=state_bytes / dp,
        muon_workspace=muon_workspace,
        activations=per_token_layer * tokens * s.num_layers / pp * in_flight / tp,
        logits=6 * tokens * s.vocab_size / tp,
    )


def choose_layout(config: ModelConfig, gpus: int, global_batch_tokens: int, optimizer: str,
                  micro_batch_size: int = 1, tensor_parallel: int | None = None,
                  pipeline_parallel: int | None = None, gpus_per_node: int = GPUS_PER_NODE,
                  memory_gib: float = H100_MEMORY_GIB) -> tuple[Layout, MemoryEstimate]:
    """The layout the module docstring's rule picks, with its memory estimate."""
    s = config.shape
    if global_batch_tokens % s.seq_length:
        raise LayoutError(f"a global batch of {global_batch_tokens} tokens is not a whole number of "
                          f"{s.seq_length}-token sequences")
    sequences = global_batch_tokens // s.seq_length
    budget = MEMORY_BUDGET_FRACTION * memory_gib * GIB
    tp_options = [tensor_parallel] if tensor_parallel else [t for t in TENSOR_PARALLEL_SIZES if t <= gpus_per_node]
    pp_options = [pipeline_parallel] if pipeline_parallel else [p for p in range(1, s.num_layers + 1)
                                                                  if s.num_layers % p == 0]
    candidates = sorted(((tp, pp) for tp in tp_options for pp in pp_options), key=lambda c: (c[0] * c[1], c[1]))
    rejected = []
    for tp, pp in candidates:
        reason = _layout_problem(config, gpus, sequences, micro_batch_size, tp, pp, gpus_per_node)
        if reason is None:
            layout = Layout(tp, pp, gpus // (tp * pp), micro_batch_size, sequences)
            memory = estimate_memory(config, layout, optimizer)
            if memory.total <= budget:
                return layout, memory
            reason = f"needs {memory.total / GIB:.1f} GiB per GPU, over the {budget / GIB:.1f} GiB budget"
        rejected.append(f"TP={tp} PP={pp}: {reason}")
    raise LayoutError(
        f"no layout of {gpus} GPUs trains {config.name} with a global batch of {sequences} sequences "
        f"({global_batch_tokens} tokens) and micro-batch {micro_batch_size}:\n  " + "\n  ".join(rejected[:12])
        + ("\n  ..." if len(rejected) > 12 else "")
        + (f"\nhint: {sequences} sequences per step keep at most {sequences // micro_batch_size} data-parallel "
           f"ranks busy; use fewer GPUs or a larger batch" if any("DP x micro-batch" in r for r in rejected) else "")
    )


def _layout_problem(config, gpus, sequences, micro_batch_size, tp, pp, gpus_per_node) -> str | None:
    s = config.shape
    if tp > gpus_per_node:
        return f"tensor parallelism {tp} spans more than the {gpus_per_node} GPUs of a node"
    if s.num_attention_heads % tp or s.num_query_groups % tp:
        return (f"{s.num_attention_heads} query / {s.num_query_groups} KV heads do not split over "
                f"tensor parallelism {tp}")
    if s.num_layers % pp:
        return f"{s.num_layers} layers do not split into {pp} equal pipeline stages"
    if gpus % (tp * pp):
        return f"{gpus} GPUs are not a multiple of TP x PP = {tp * pp}"
    dp = gpus // (tp * pp)
    if sequences % (dp * micro_batch_size):
        return (f"the global batch of {sequences} sequences is not divisible by DP x micro-batch = "
                f"{dp} x {micro_batch_size} = {dp * micro_batch_size}")
    return None


@dataclass(frozen=True)
class RunPlan:
    config: ModelConfig
    optimizer: str
    nodes: int
    gpus_per_node: int
    layout: Layout
    memory: MemoryEstimate
    train_iters: int
    env: dict[str, str]
    command: list[str]
    notes: tuple[str, ...] = ()

    @property
    def tokens_per_step(self) -> int:
        return self.layout.global_batch_size * self.config.shape.seq_length

    def describe(self) -> str:
        c, l = self.config, self.layout
        lines = [
            f"model        {c.name}: {c.parameter_count() / 1e9:.2f}B parameters ({c.shape.num_layers} layers, "
            f"d_model {c.shape.hidden_size}, vocab {c.shape.vocab_size}, sequence {c.shape.seq_length})",
            f"optimizer    {self.optimizer}",
            f"GPUs         {self.nodes} node(s) x {self.gpus_per_node} = {self.nodes * self.gpus_per_node}",
            f"layout       TP={l.tensor_parallel} PP={l.pipeline_parallel} DP={l.data_parallel}, micro-batch "
            f"{l.micro_batch_size}, {l.micro_batches_per_step} micro-batch(es) per DP rank per step",
            f"tokens/step  {self.tokens_per_step:,} ({l.global_batch_size} sequences)",
            f"steps        {self.train_iters:,} ({self.train_iters * self.tokens_per_step:,} tokens)",
            f"memory/GPU   {self.memory.table()} (estimate; budget "
            f"{MEMORY_BUDGET_FRACTION * H100_MEMORY_GIB:.1f} GiB)",
            *(f"note         {note}" for note in self.notes),
            "command      " + " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()),
                                         *map(_quote_keeping_variables, self.command)]),
        ]
        return "\n".join(lines)


def plan_run(model: str, optimizer: str, nodes: int, batch_tokens: int, lr: float, *,
             train_tokens: int | None = None, train_iters: int | None = None, micro_batch_size: int = 1,
             tensor_parallel: int | None = None, pipeline_parallel: int | None = None,
             gpus_per_node: int = GPUS_PER_NODE, ns_precision: str = "bf16", weight_decay: float = 0.1,
             warmup_fraction: float = 0.01, save_dir: str = "checkpoints", save_interval: int = 1000,
             tensorboard_dir: str | None = None, wandb_project: str | None = None, run_name: str | None = None,
             rdzv_endpoint: str | None = None, data_args: list[str] | None = None,
             extra_args: list[str] | None = None) -> RunPlan:
    """The full plan of one run; `command` is the torchrun command every node runs."""
    if optimizer not in ("muon", "adam"):
        raise ValueError(f"optimizer must be 'muon' or 'adam' (the AdamW baseline), got {optimizer!r}")
    if nodes < 1 or gpus_per_node < 1:
        raise ValueError(f"need at least one node and one GPU per node, got {nodes} x {gpus_per_node}")
    config = get_model_config(model)
    layout, memory = choose_layout(config, nodes * gpus_per_node, batch_tokens, optimizer, micro_batch_size,
                                   tensor_parallel, pipeline_parallel, gpus_per_node)
    tokens_per_step = layout.global_batch_size * config.shape.seq_length
    if train_iters is None:
        train_tokens = train_tokens or PAPER_TRAIN_TOKENS.get(model)
        if train_tokens is None:
            raise ValueError(f"the paper gives no training length for {model}: pass --train-tokens or --train-iters")
        train_iters = math.ceil(train_tokens / tokens_per_step)
    run_name = run_name or f"{model}-{optimizer}-{_format_tokens(tokens_per_step)}"
    train = [
        "--model-config", model,
        "--tensor-model-parallel-size", str(layout.tensor_parallel),
        "--pipeline-model-parallel-size", str(layout.pipeline_parallel),
        *(["--sequence-parallel"] if layout.tensor_parallel > 1 else []),
        "--micro-batch-size", str(layout.micro_batch_size),
        "--global-batch-size", str(layout.global_batch_size),
        "--bf16",
        "--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather",
        "--optimizer", optimizer,
        *(["--muon-ns-precision", ns_precision] if optimizer == "muon" else
          # The paper's AdamW betas are not published; (0.9, 0.95) is the usual LLM baseline.
          ["--adam-beta1", "0.9", "--adam-beta2", "0.95"]),
        "--lr", _number(lr), "--min-lr", _number(lr / 10),  # the paper: cosine decay to 0.1 x peak
        "--lr-decay-style", "cosine", "--lr-warmup-fraction", _number(warmup_fraction),
        "--weight-decay", _number(weight_decay), "--clip-grad", "1.0",
        "--train-iters", str(train_iters),
        "--distributed-backend", "nccl",
        "--save", save_dir, "--load", save_dir, "--save-interval", str(save_interval),
        "--ckpt-format", "torch_dist", "--dist-ckpt-optim-fully-reshardable",
        "--log-interval", "10", "--log-throughput",
        "--eval-interval", str(save_interval), "--eval-iters", "10",
        "--tensorboard-dir", tensorboard_dir or os.path.join(save_dir, "tensorboard"),
        *(["--wandb-project", wandb_project, "--wandb-exp-name", run_name] if wandb_project else []),
        *(data_args or []),
        *(extra_args or []),
    ]
    if nodes == 1:
        launcher = ["torchrun", "--standalone", "--nproc-per-node", str(gpus_per_node)]
    else:
        endpoint = rdzv_endpoint or "${MASTER_ADDR}:${MASTER_PORT}"
        launcher = ["torchrun", "--nnodes", str(nodes), "--nproc-per-node", str(gpus_per_node),
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", run_name]
    # Megatron asks for one CUDA connection with TP so its communication overlaps in issue order.
    env = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if layout.tensor_parallel > 1 else {}
    notes = []
    if layout.pipeline_parallel > layout.micro_batches_per_step:
        notes.append(f"{layout.pipeline_parallel} pipeline stages but {layout.micro_batches_per_step} micro-batch(es) "
                     f"per step: most of each step is pipeline bubble; fewer GPUs would do the same work")
    return RunPlan(config, optimizer, nodes, gpus_per_node, layout, memory, train_iters, env,
                   [*launcher, "-m", "megatron_muon.train", *train], tuple(notes))


def _number(value: float) -> str:
    return f"{value:.10g}"


def _format_tokens(tokens: int) -> str:
    for unit in ("G", "M", "K"):
        if tokens % TOKEN_UNITS[unit] == 0:
            return f"{tokens // TOKEN_UNITS[unit]}{unit}"
    return str(tokens)


def _quote_keeping_variables(arg: str) -> str:
    return arg if arg.startswith("${") and "'" not in arg else shlex.quote(arg)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m megatron_muon.cluster",
                                     description="Plan (--dry-run) or launch one node's part of a multi-node run.")
    parser.add_argument("--model", required=True, choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--optimizer", required=True, choices=["muon", "adam"], help="adam: the AdamW baseline")
    parser.add_argument("--nodes", type=int, default=int(os.environ.get("SLURM_JOB_NUM_NODES", 1)))
    parser.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE)
    parser.add_argument("--batch-tokens", type=parse_tokens, required=True, help="global batch, e.g. 1M .. 16M")
    parser.add_argument("--lr", type=float, required=True, help="peak learning rate (the paper publishes none)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--train-tokens", type=parse_tokens, default=None,
                        help=f"default: the paper's budget where it gives one ({', '.join(PAPER_TRAIN_TOKENS)})")
    length.add_argument("--train-iters", type=int, default=None)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--tensor-parallel", type=int, default=None, help="fix TP instead of the rule's choice")
    parser.add_argument("--pipeline-parallel", type=int, default=None, help="fix PP instead of the rule's choice")
    parser.add_argument("--ns-precision", choices=["fp32", "bf16", "fp8"], default="bf16",
                        help="Newton-Schulz GEMM precision (--muon-ns-precision)")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-fraction", type=float, default=0.01,
                        help="share of steps in linear warmup (the paper does not state its warmup)")
    parser.add_argument("--save-dir", default="checkpoints")
    parser.add_argument("--save-interval", type=int, default=1000)
    parser.add_argument("--tensorboard-dir", default=None, help="default: SAVE_DIR/tensorboard")
    parser.add_argument("--wandb-project", default=None, help="log to Weights & Biases too (Megatron's flags)")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--data-path", nargs="+", default=None,
                        help="Megatron --data-path prefixes (default: the training entry's embedded corpus)")
    parser.add_argument("--tokenizer-type", default=None)
    parser.add_argument("--tokenizer-model", default=None)
    parser.add_argument("--rdzv-endpoint", default=None, help="host:port (default: $MASTER_ADDR:$MASTER_PORT)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the command; launch nothing")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    args = _parser().parse_args(own)
    data_args = []
    if args.data_path:
        data_args += ["--data-path", *args.data_path, "--split", "99,1,0"]
    if args.tokenizer_type:
        data_args += ["--tokenizer-type", args.tokenizer_type]
    if args.tokenizer_model:
        data_args += ["--tokenizer-model", args.tokenizer_model]
    endpoint = args.rdzv_endpoint
    if endpoint is None and "MASTER_ADDR" in os.environ:
        endpoint = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '29500')}"
    try:
        plan = plan_run(
            args.model, args.optimizer, args.nodes, args.batch_tokens, args.lr, train_tokens=args.train_tokens,
            train_iters=args.train_iters, micro_batch_size=args.micro_batch_size,
            tensor_parallel=args.tensor_parallel, pipeline_parallel=args.pipeline_parallel,
            gpus_per_node=args.gpus_per_node, ns_precision=args.ns_precision, weight_decay=args.weight_decay,
            warmup_fraction=args.warmup_fraction, save_dir=args.save_dir, save_interval=args.save_interval,
            tensorboard_dir=args.tensorboard_dir, wandb_project=args.wandb_project, run_name=args.run_name,
            rdzv_endpoint=endpoint, data_args=data_args, extra_args=extra,
        )
    except (LayoutError, ValueError, KeyError) as err:
        raise SystemExit(f"error: {err}") from None
    print(plan.describe(), flush=True)
    if args.dry_run:
        return
    if args.nodes > 1 and endpoint is None:
        raise SystemExit("error: a multi-node launch needs --rdzv-endpoint or MASTER_ADDR (the sbatch scripts set it)")
    os.execvpe(plan.command[0], plan.command, {**os.environ, **plan.env})


if __name__ == "__main__":
    main()
