"""Coordinate check: does every activation and every update of a megatron-core GPT keep its size as width grows?

muP's promise is that, at a fixed learning rate, each coordinate of each activation stays Theta(1) whatever the
width, at initialization and after any number of steps (TP5, arXiv 2203.03466, Sec. 6 and the `mup` package's
coord check). Standard parametrization (SP) breaks it: after one high-LR step the hidden activations grow with
width. This module measures it on Megatron's own GPTModel, trained by the plugin's Muon or Megatron's AdamW:

* models at several widths and a fixed depth: head_dim, heads per query group and the ffn / hidden ratio stay
  fixed, so every width ratio is the same single number (`mup_rules` then needs no per-matrix base shapes);
* the same fixed batch every step, at a deliberately high learning rate, constant, no clipping, no weight decay;
* per step t and width, from forward hooks: the mean |h_t| ("act") and mean |h_t - h_0| ("delta") of the embedding
  output, Q, K, V (the fused linear_qkv output, split with Megatron's per-query-group layout), the attention logits
  q k^T x softmax_scale (causal part), the attention output projection, the MLP gate / up (fc1) and down (fc2)
  outputs, and the logits as the loss sees them (x mup_output_mult);
* per step, the spectral norm of each hidden matrix's update W_t - W_{t-1} ("update"; Q, K, V, gate and up as
  their own logical matrices): the spectral condition (arXiv 2310.17813) wants it Theta(sqrt(fan_out / fan_in)),
  which is width-independent here because every fan ratio is fixed.

SP: the model as built without any muP field, the same LR at every width (Muon with its default essential scale).
muP: `transformer_config_fields` + `apply_mup` with the smallest width as the base, and the preset's Muon scale mode.

The spread of a (parametrization, quantity, module) is max / min over widths, at the worst step t >= 1.
Step 0 is left out: muP fixes the init of the hidden activations, but its logits start smaller at larger widths by
design (mup README): a random readout of a width-n vector is ~ sqrt(n), and both presets' logit multiplier and
init bring it to ~ 1/sqrt(width). Training aligns the readout within a step or two.
"""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_muon.models.shapes import GPTShape
from megatron_muon.mup.rules import get_preset

PARAMETRIZATIONS = ("sp", "mup")
OPTIMIZERS = ("muon", "adamw")
# High enough that SP's hidden activations visibly grow with width within a few steps. AdamW's is lower: at 1e-2 its
# muP run oscillates on the fixed batch (spreads up to 2.5 at widths 64-512), which hides the width trend.
DEFAULT_LRS = {"muon": 1e-2, "adamw": 3e-3}
ACT, DELTA, UPDATE = "act", "delta", "update"
QUANTITIES = (ACT, DELTA, UPDATE)
QUANTITY_LABELS = {
    ACT: "mean |h_t|",
    DELTA: "mean |h_t - h_0|",
    UPDATE: "||W_t - W_(t-1)||_2",
}
# Per-layer modules in forward order; "embedding" comes before them and "logits" after.
LAYER_MODULES = ("q", "k", "v", "attn_logits", "proj", "gate", "up", "down")
# The hidden activations: both fans grow with width. SP must fail on these (embedding and logits have one fixed fan).
HIDDEN_MODULES = ("q", "k", "v", "proj", "gate", "up", "down")


@dataclass(frozen=True)
class CoordCheckConfig:
    widths: tuple[int, ...] = (64, 128, 256, 512)
    num_layers: int = 2
    head_dim: int = 16
    heads_per_query_group: int = 2
    # Gated (SwiGLU) MLP; ffn_hidden = ffn_ratio x hidden, a whole number so every width scales it exactly.
    ffn_ratio: int = 3
    vocab_size: int = 256
    seq_length: int = 32
    micro_batch: int = 8
    steps: int = 5
    optimizer: str = "muon"
    lr: float | None = None  # None: DEFAULT_LRS[optimizer]
    weight_decay: float = 0.0
    preset: str = "essential"
    parametrizations: tuple[str, ...] = PARAMETRIZATIONS
    seeds: int = 1
    seed: int = 0

    def __post_init__(self):
        if len(self.widths) < 2 or list(self.widths) != sorted(set(self.widths)):
            raise ValueError(f"widths must be at least two distinct increasing sizes, got {self.widths}")
        group_width = self.head_dim * self.heads_per_query_group
        if any(w % group_width for w in self.widths):
            raise ValueError(
                f"every width must be a multiple of head_dim x heads_per_query_group = {group_width} "
                f"(width grows by adding query groups of whole heads), got {self.widths}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        unknown = set(self.parametrizations) - set(PARAMETRIZATIONS)
        if unknown or not self.parametrizations:
            raise ValueError(f"parametrizations must be some of {PARAMETRIZATIONS}, got {self.parametrizations}")
        get_preset(self.preset)
        if self.lr is None:
            object.__setattr__(self, "lr", DEFAULT_LRS[self.optimizer])
        if self.steps < 1 or self.seeds < 1:
            raise ValueError(f"steps and seeds must be >= 1, got {self.steps} and {self.seeds}")

    @property
    def base_width(self) -> int:
        return self.widths[0]

    def shape(self, width: int) -> GPTShape:
        heads = width // self.head_dim
        return GPTShape(
            num_layers=self.num_layers,
            hidden_size=width,
            num_attention_heads=heads,
            num_query_groups=heads // self.heads_per_query_group,
            kv_channels=self.head_dim,
            ffn_hidden_size=self.ffn_ratio * width,
            gated_linear_unit=True,
            vocab_size=self.vocab_size,
            seq_length=self.seq_length,
        )

    def module_names(self) -> list[str]:
        layers = [f"L{i}.{m}" for i in range(self.num_layers) for m in LAYER_MODULES]
        return ["embedding", *layers, "logits"]


@dataclass(frozen=True)
class Record:
    """One measured value, the mean over seeds."""

    parametrization: str
    width: int
    step: int
    module: str
    quantity: str
    value: float


@dataclass(frozen=True)
class Spread:
    """max / min over widths of one (parametrization, quantity, module), at its worst step t >= 1.

    exponent: the least-squares slope of log(value) against log(width) at that step, so value ~ width ** exponent.
    """

    ratio: float
    step: int
    exponent: float


@dataclass
class CoordCheckResult:
    config: CoordCheckConfig
    records: list[Record] = field(default_factory=list)

    def values(self, parametrization: str, quantity: str, module: str, step: int) -> dict[int, float]:
        """width -> value."""
        return {
            r.width: r.value
            for r in self.records
            if (r.parametrization, r.quantity, r.module, r.step) == (parametrization, quantity, module, step)
        }

    def spreads(self) -> dict[tuple[str, str, str], Spread]:
        """(parametrization, quantity, module) -> its spread over widths."""
        out = {}
        for p in self.config.parametrizations:
            for quantity in QUANTITIES:
                for module in self.config.module_names():
                    per_step = [
                        (step, self.values(p, quantity, module, step)) for step in range(1, self.config.steps + 1)
                    ]
                    per_step = [(step, v) for step, v in per_step if v]
                    if not per_step:
                        continue
                    out[p, quantity, module] = max((_spread(step, v) for step, v in per_step), key=lambda s: s.ratio)
        return out


def _spread(step: int, by_width: dict[int, float]) -> Spread:
    widths = sorted(by_width)
    values = [by_width[w] for w in widths]
    if min(values) <= 0:
        return Spread(math.inf, step, math.nan)
    xs, ys = [math.log(w) for w in widths], [math.log(v) for v in values]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return Spread(max(values) / min(values), step, slope)


# ---------------------------------------------------------------------------------------------------------------
# Measuring one model (runs inside a gloo rank).
# ---------------------------------------------------------------------------------------------------------------
def _rows_by_matrix(name: str, weight: torch.Tensor, config) -> dict[str, torch.Tensor]:
    """Logical matrix role ("q", "gate", ...; the parameter's own role when unsplit) -> its rows of the fused weight.

    A linear layer's output channel i is its weight's row i, so the same indices split the layer's output.
    """
    from megatron_muon.integration.layouts import LayoutOptions, matrix_blocks

    pieces = defaultdict(list)
    for block in matrix_blocks(name, weight, config, 0, 1, LayoutOptions(split_qkv=True, split_glu=True)):
        rows = torch.arange(block.local.row0, block.local.row0 + block.local.rows)
        pieces[block.matrix].append((block.logical_row0, rows))
    return {
        matrix.rpartition(":")[2]: torch.cat([rows for _, rows in sorted(parts, key=lambda part: part[0])])
        for matrix, parts in pieces.items()
    }


class _Recorder:
    """Forward hooks that record each tracked module's activation size per step, and the hidden matrices'
    updates."""

    def __init__(self, model):
        self.step = 0
        self.initial: dict[str, torch.Tensor] = {}
        self.rows: list[tuple[int, str, str, float]] = []
        self.matrices: dict[str, tuple[torch.nn.Parameter, torch.Tensor]] = {}  # module -> (weight, its rows)
        config = model.config
        self._hook(model.embedding, "embedding")
        for i, layer in enumerate(model.decoder.layers):
            attention, mlp = layer.self_attention, layer.mlp
            prefix = f"L{i}."
            qkv_name = f"decoder.layers.{i}.self_attention.linear_qkv.weight"
            self._split_hook(qkv_name, attention.linear_qkv, prefix, config)
            attention.core_attention.register_forward_pre_hook(self._attention_logits_hook(prefix + "attn_logits"))
            self._hook(attention.linear_proj, prefix + "proj", weight=attention.linear_proj.weight)
            self._split_hook(f"decoder.layers.{i}.mlp.linear_fc1.weight", mlp.linear_fc1, prefix, config)
            self._hook(mlp.linear_fc2, prefix + "down", weight=mlp.linear_fc2.weight)
        # Megatron scales the logits after output_layer (LanguageModule._scale_logits): measure what the loss sees.
        logit_mult = config.mup_output_mult if config.use_mup else 1.0
        self._hook(model.output_layer, "logits", scale=logit_mult)

    def _record(self, module: str, activation: torch.Tensor) -> None:
        x = activation.detach().float()
        if self.step == 0:
            self.initial[module] = x.clone()
        self.rows.append((self.step, module, ACT, float(x.abs().mean())))
        if self.step > 0:
            self.rows.append((self.step, module, DELTA, float((x - self.initial[module]).abs().mean())))

    def _hook(self, module, name: str, scale: float = 1.0, weight=None) -> None:
        if weight is not None:
            self.matrices[name] = (weight, torch.arange(weight.shape[0]))

        def hook(_module, _inputs, output):
            self._record(name, _first(output) * scale)

        module.register_forward_hook(hook)

    def _split_hook(self, param_name: str, module, prefix: str, config) -> None:
        rows = _rows_by_matrix(param_name, module.weight, config)
        for role, index in rows.items():
            self.matrices[prefix + role] = (module.weight, index)

        def hook(_module, _inputs, output):
            out = _first(output)
            for role, index in rows.items():
                self._record(prefix + role, out.index_select(-1, index))

        module.register_forward_hook(hook)

    def _attention_logits_hook(self, name: str):
        def hook(core_attention, args):
            query, key = args[0], args[1]  # [seq, batch, heads or groups, head_dim], after RoPE
            key = key.repeat_interleave(query.shape[2] // key.shape[2], dim=2)
            logits = torch.einsum("sbnd,tbnd->bnst", query.float(), key.float()) * core_attention.softmax_scale
            seq = query.shape[0]
            causal = torch.ones(seq, seq, dtype=torch.bool).tril()
            self._record(name, logits[..., causal])

        return hook

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: weight.detach()[rows].float().clone() for name, (weight, rows) in self.matrices.items()}

    def record_updates(self, before: dict[str, torch.Tensor]) -> None:
        for name, (weight, rows) in self.matrices.items():
            update = weight.detach()[rows].float() - before[name]
            self.rows.append((self.step, name, UPDATE, float(torch.linalg.matrix_norm(update, ord=2))))


def _first(output):
    """Megatron's linear layers return (output, bias)."""
    return output[0] if isinstance(output, tuple) else output


def _optimizer_config(config: CoordCheckConfig, parametrization: str):
    from megatron_muon.integration.flags import PAPER_ADAM_BETAS, MuonOptimizerConfig

    common = dict(
        lr=config.lr,
        min_lr=config.lr,
        weight_decay=config.weight_decay,
        clip_grad=0.0,  # the global grad norm depends on width: clipping would be a width-dependent LR
        use_distributed_optimizer=False,
    )
    if config.optimizer == "adamw":
        # nanoGPT-mup's AdamW coordinate check (betas 0.9, 0.95); Megatron's Adam with the muP tags as overrides.
        return MuonOptimizerConfig(optimizer="adam", adam_beta1=0.9, adam_beta2=0.95, **common)
    scale_mode = get_preset(config.preset).muon_scale_mode if parametrization == "mup" else "essential"
    return MuonOptimizerConfig(
        optimizer="muon", adam_beta1=PAPER_ADAM_BETAS[0], adam_beta2=PAPER_ADAM_BETAS[1], muon_scale_mode=scale_mode,
        muon_ns_precision="fp32",
        **common,
    )


def measure_one(config: CoordCheckConfig, parametrization: str, width: int, seed: int) -> list[tuple]:
    """Train one width for config.steps steps on one fixed batch; (step, module, quantity, value) rows.

    Needs a torch.distributed process group (one gloo rank is enough).
    """
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import LRSchedule, MupSetup, Trainer, TrainingSetup, synthetic_batches

    shape = config.shape(width)
    mup = MupSetup(config.preset, config.base_width) if parametrization == "mup" else None
    with model_parallel(seed=seed):
        # The scheduler is what writes each param group's own lr (muP's max_lr) and weight decay (wd_mult).
        trainer = Trainer(TrainingSetup(shape, _optimizer_config(config, parametrization), mup=mup,
                                        schedule=LRSchedule(decay_steps=config.steps), seed=seed))
        recorder = _Recorder(trainer.models[0])
        batch = synthetic_batches(shape, config.micro_batch, 1, seed=seed + 1)
        for step in range(config.steps):
            recorder.step = step
            before = recorder.snapshot()
            trainer.step(batch)
            recorder.step = step + 1
            recorder.record_updates(before)
        trainer.evaluate(batch)
    return recorder.rows


def _measure_all(config: CoordCheckConfig, verbose: bool) -> list[tuple]:
    # megatron-core warns that GPTModel is deprecated once per model built: that would bury the progress lines.
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
    rows = []
    for parametrization in config.parametrizations:
        for width in config.widths:
            for seed in range(config.seed, config.seed + config.seeds):
                if verbose:
                    print(f"coord check: {parametrization} width {width} seed {seed}", flush=True)
                measured = measure_one(config, parametrization, width, seed)
                rows += [(parametrization, width, seed, *row) for row in measured]
    return rows


def coord_check(config: CoordCheckConfig, verbose: bool = False) -> CoordCheckResult:
    """Run the whole check in one spawned gloo rank (megatron-core's import costs more than a small model)."""
    from megatron_muon.testing.ranks import run_ranks

    rows = run_ranks(_measure_all, 1, (config, verbose), timeout=3600)[0]
    by_key = defaultdict(list)
    for parametrization, width, _seed, step, module, quantity, value in rows:
        by_key[parametrization, width, step, module, quantity].append(value)
    records = [Record(*key, sum(values) / len(values)) for key, values in by_key.items()]
    return CoordCheckResult(config, records)


# ---------------------------------------------------------------------------------------------------------------
# Output: CSV, plot, spread table.
# ---------------------------------------------------------------------------------------------------------------
def write_csv(result: CoordCheckResult, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(Record.__dataclass_fields__))
        writer.writeheader()
        for r in sorted(result.records, key=lambda r: (r.parametrization, r.quantity, r.width, r.step, r.module)):
            writer.writerow(asdict(r))


def plot(result: CoordCheckResult, quantity: str, path: Path) -> None:
    """One panel per step (columns) and parametrization (rows); width on a log2 axis, one line per module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = result.config
    first_step = 0 if quantity == ACT else 1
    steps = list(range(first_step, config.steps + 1))
    rows = len(config.parametrizations)
    fig, axes = plt.subplots(
        rows, len(steps), figsize=(2.6 * len(steps) + 2.5, 2.6 * rows), sharex=True, sharey="col", squeeze=False
    )
    colors = plt.get_cmap("tab10")
    kinds = ["embedding", *LAYER_MODULES, "logits"]
    styles = ["-", "--", ":", "-."]
    for row, parametrization in enumerate(config.parametrizations):
        for col, step in enumerate(steps):
            ax = axes[row][col]
            for module in config.module_names():
                by_width = result.values(parametrization, quantity, module, step)
                if not by_width:
                    continue
                layer, _, kind = module.partition(".") if "." in module else ("", "", module)
                style = styles[int(layer[1:]) % len(styles)] if layer else "-"
                widths = sorted(by_width)
                ax.plot(widths, [by_width[w] for w in widths], style, marker="o", markersize=2.5,
                        color=colors(kinds.index(kind) % 10), label=module)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{parametrization.upper()}  t={step}", fontsize=9)
            ax.tick_params(labelsize=7)
            if row == rows - 1:
                ax.set_xlabel("width", fontsize=8)
            if col == 0:
                ax.set_ylabel(QUANTITY_LABELS[quantity], fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # the first panel may lack modules (no update at init)
        h, l = ax.get_legend_handles_labels()
        if len(l) > len(labels):
            handles, labels = h, l
    fig.legend(handles, labels, loc="center right", fontsize=7, frameon=False)
    preset = f", muP preset {config.preset}" if "mup" in config.parametrizations else ""
    fig.suptitle(
        f"coordinate check: {QUANTITY_LABELS[quantity]}, {config.optimizer} lr {config.lr:g}{preset}, "
        f"{config.num_layers} layers, base width {config.base_width}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 0.86, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def spread_table(result: CoordCheckResult):
    """A rich Table: per module, the spread (and its exponent) of each quantity under each parametrization."""
    from rich.table import Table

    config = result.config
    spreads = result.spreads()
    table = Table(
        title=f"spread over widths {list(config.widths)} = max / min at the worst step t >= 1 "
        f"(value ~ width^exponent); {config.optimizer}, lr {config.lr:g}, muP preset {config.preset}",
        title_justify="left",
    )
    table.add_column("module")
    columns = [(q, p) for q in QUANTITIES for p in config.parametrizations]
    for quantity, parametrization in columns:
        table.add_column(f"{QUANTITY_LABELS[quantity]}\n{parametrization.upper()}", justify="right")
    for module in config.module_names():
        cells = []
        for key in [(p, q, module) for q, p in columns]:
            s = spreads.get(key)
            cells.append("" if s is None else f"{s.ratio:.2f} ({s.exponent:+.2f})")
        table.add_row(module, *cells)
    return table
