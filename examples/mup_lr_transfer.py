"""muP learning-rate transfer on CPU: sweep the LR at several widths, under SP and under muP, with Muon.

Each width trains megatron-core's GPTModel (GQA, gated MLP, RMSNorm, RoPE, tied embeddings; fixed depth, head_dim
and GQA ratio, so width grows by adding heads) on a synthetic Markov language of known entropy (every token has
`--branching` equally likely successors: the best achievable loss is ln(branching)), with the plugin's Muon on the
hidden matrices and AdamW on embeddings and norms, through Megatron's own DDP, optimizer wrapper and LR scheduler
(warmup, then cosine to 0.1x). Every run of a width sees the same batches; the score is the loss on a fixed
held-out set after `--steps` steps.

SP trains every width at the same LR grid without any muP field. muP builds each width with
`transformer_config_fields` and `apply_mup` relative to the smallest width (`--preset`, default the paper's
`essential`), so the LR is always the base model's LR. If muP transfers, each width's best LR stays where the base
width's is; under SP it drifts with width. The grid is a 2x (one octave) grid; the optimum printed is the vertex of
a parabola through the best grid point and its two neighbours in log2(LR), so it can fall between grid points.

    python examples/mup_lr_transfer.py                       # widths 32..256: about 20 minutes on one CPU core
    python examples/mup_lr_transfer.py --preset spectral --widths 32 64 128
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megatron_muon.mup.rules import PRESETS
from megatron_muon.testing.ranks import run_ranks

PARAMETRIZATIONS = ("sp", "mup")


def gpt_shape(width: int, args):
    from megatron_muon.models.shapes import GPTShape

    heads = width // args.head_dim
    return GPTShape(
        num_layers=args.layers, hidden_size=width, num_attention_heads=heads, num_query_groups=heads // 2,
        kv_channels=args.head_dim, ffn_hidden_size=args.ffn_ratio * width, vocab_size=args.vocab,
        seq_length=args.seq_length,
    )


def train(parametrization: str, width: int, lr: float, data: dict, args) -> float:
    """Held-out loss after args.steps steps; inf if the run diverged."""
    from megatron_muon.integration.flags import PAPER_ADAM_BETAS, MuonOptimizerConfig
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import LRSchedule, MupSetup, Trainer, TrainingSetup
    from megatron_muon.mup.rules import get_preset

    # head_dim is fixed across widths: muP keeps SP's 1/sqrt(head_dim) attention scale (Megatron's use_mup default
    # is 1/head_dim), so the muP base model is the SP model of the same width.
    mup = MupSetup(args.preset, args.widths[0]) if parametrization == "mup" else None
    optimizer = MuonOptimizerConfig(
        optimizer="muon", lr=lr, min_lr=0.1 * lr, weight_decay=args.wd, clip_grad=args.clip_grad,
        adam_beta1=PAPER_ADAM_BETAS[0], adam_beta2=PAPER_ADAM_BETAS[1], muon_ns_precision="fp32",
        muon_scale_mode=get_preset(args.preset).muon_scale_mode if mup else "essential",
    )
    # The scheduler writes each param group's own peak LR (muP's per-parameter max_lr / min_lr) and weight decay.
    schedule = LRSchedule(decay_steps=args.steps, warmup_steps=max(1, args.steps // 10), style="cosine")
    with model_parallel(seed=args.seed):
        trainer = Trainer(TrainingSetup(gpt_shape(width, args), optimizer, mup=mup, schedule=schedule, seed=args.seed))
        for step_batches in data["train"]:
            if not math.isfinite(trainer.forward_backward(step_batches)):
                return math.inf
            trainer.finalize_grads()
            trainer.optimizer_step()
        held_out = trainer.evaluate(data["held_out"])
    return held_out if math.isfinite(held_out) else math.inf


def sweep(args) -> dict:
    """(parametrization, width, lr) -> held-out loss, all in this process (megatron-core's import costs more than
    a small run)."""
    import logging

    from megatron_muon.integration.training import token_batches
    from megatron_muon.sweep.trial import markov_successors, sample_sequences

    # megatron-core warns that GPTModel is deprecated once per model built: that would bury the progress lines.
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
    successors = markov_successors(args.vocab, args.branching, seed=0)
    train_gen = torch.Generator().manual_seed(1)
    data = {
        "train": [
            token_batches(sample_sequences(successors, args.batch, args.seq_length + 1, train_gen), args.micro_batch)
            for _ in range(args.steps)
        ],
        "held_out": token_batches(
            sample_sequences(successors, 64, args.seq_length + 1, torch.Generator().manual_seed(2)), args.micro_batch
        ),
    }
    losses = {}
    for parametrization in args.parametrizations:
        for width in args.widths:
            for lr in args.lrs:
                start = time.perf_counter()
                losses[parametrization, width, lr] = train(parametrization, width, lr, data, args)
                print(f"{parametrization:>3} width {width:>4} lr {lr:<9.4g} held-out loss "
                      f"{losses[parametrization, width, lr]:.4f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    return losses


def optimum(lrs: list[float], losses: list[float]) -> float:
    """The best LR: the vertex of the parabola in log2(lr) through the best grid point and its neighbours.

    At the edge of the grid, or where the three points are not convex, the best grid point itself.
    """
    best = min(range(len(lrs)), key=lambda i: losses[i])
    if best in (0, len(lrs) - 1) or not all(math.isfinite(losses[i]) for i in (best - 1, best, best + 1)):
        return lrs[best]
    (x0, x1, x2), (y0, y1, y2) = (math.log2(lrs[i]) for i in (best - 1, best, best + 1)), losses[best - 1 : best + 2]
    curvature = (y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)
    if curvature <= 0:
        return lrs[best]
    # Vertex of the parabola through three points (x equally spaced in log2 on a 2x grid, but kept general).
    numerator = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    denominator = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    return 2 ** (x1 - 0.5 * numerator / denominator)


def plot(losses: dict, optima: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.parametrizations), figsize=(5.5 * len(args.parametrizations), 4.2),
                             sharey=True, squeeze=False)
    colors = plt.get_cmap("viridis")
    finite = [v for v in losses.values() if math.isfinite(v)]
    for ax, parametrization in zip(axes[0], args.parametrizations):
        for i, width in enumerate(args.widths):
            color = colors(i / max(1, len(args.widths) - 1))
            ys = [losses[parametrization, width, lr] for lr in args.lrs]
            ax.plot(args.lrs, ys, marker="o", markersize=3, color=color, label=f"width {width}")
            best = optima[parametrization, width]
            ax.axvline(best, color=color, linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate (base width's, for muP)")
        title = "SP" if parametrization == "sp" else f"muP ({args.preset}, base width {args.widths[0]})"
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"held-out loss after {args.steps} steps")
    # The optima differ by hundredths of a nat: show the basin, not the divergent edges.
    axes[0][0].set_ylim(min(finite) - 0.03, min(max(finite), min(finite) + 0.75))
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"Muon LR transfer, {args.layers} layers, head_dim {args.head_dim}; dotted: each width's optimum",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256],
                        help="increasing; the first is the muP base")
    parser.add_argument("--lrs", type=float, nargs="+", default=[2.0**k for k in range(-9, -1)],
                        help="the LR grid (default 2^-9 .. 2^-2, one octave apart)")
    parser.add_argument("--parametrizations", nargs="+", choices=PARAMETRIZATIONS, default=list(PARAMETRIZATIONS))
    parser.add_argument("--preset", default="essential", choices=sorted(PRESETS),
                        help="muP preset: essential (the paper's), essential_exact or spectral")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=8)
    parser.add_argument("--ffn-ratio", type=int, default=3, help="ffn_hidden_size / hidden (gated MLP)")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--branching", type=int, default=4)
    parser.add_argument("--wd", type=float, default=0.0)
    parser.add_argument("--clip-grad", type=float, default=0.0,
                        help="0 = off (default): the global grad norm depends on width, so clipping would too")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out-dir", type=Path, default=Path("results/mup_lr_transfer"))
    args = parser.parse_args()
    args.lrs = sorted(args.lrs)
    if args.widths != sorted(set(args.widths)) or any(w % (2 * args.head_dim) for w in args.widths):
        parser.error(f"--widths must increase and be multiples of 2 x --head-dim = {2 * args.head_dim}")
    if args.batch % args.micro_batch:
        parser.error("--batch must be a multiple of --micro-batch")

    losses = run_ranks(sweep, 1, (args,), timeout=24 * 3600)[0]
    optima = {
        (p, w): optimum(args.lrs, [losses[p, w, lr] for lr in args.lrs])
        for p in args.parametrizations for w in args.widths
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "lr_transfer.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["parametrization", "width", "lr", "held_out_loss"])
        for (p, w, lr), loss in sorted(losses.items()):
            writer.writerow([p, w, lr, loss])
    plot(losses, optima, args, args.out_dir / "lr_transfer.png")

    print(f"\nheld-out loss after {args.steps} steps (best achievable ln({args.branching}) = "
          f"{math.log(args.branching):.3f}); * marks each width's best grid LR")
    for p in args.parametrizations:
        print(f"\n{p.upper()}" + (f" (preset {args.preset}, base width {args.widths[0]})" if p == "mup" else ""))
        print(f"{'lr':>10} " + " ".join(f"{'w' + str(w):>9}" for w in args.widths))
        for lr in args.lrs:
            cells = []
            for w in args.widths:
                column = [losses[p, w, x] for x in args.lrs]
                star = "*" if losses[p, w, lr] == min(column) else " "
                cells.append(f"{losses[p, w, lr]:>8.4f}{star}")
            print(f"{lr:>10.4g} " + " ".join(cells))
    print("\noptimum LR per width (parabola vertex in log2 LR), and its shift from the base width in octaves")
    for p in args.parametrizations:
        base = optima[p, args.widths[0]]
        cells = ", ".join(f"w{w}: {optima[p, w]:.3g} ({math.log2(optima[p, w] / base):+.2f})" for w in args.widths)
        print(f"  {p.upper():>3}: {cells}")
    print(f"\nwrote {args.out_dir / 'lr_transfer.csv'} and {args.out_dir / 'lr_transfer.png'}")


if __name__ == "__main__":
    main()
