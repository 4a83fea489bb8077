"""`make demo`: Muon vs AdamW on real text, on CPU, in about ten minutes on two cores.

1. Builds the embedded dataset on first use (the running interpreter's Python standard library, a sentencepiece
   tokenizer, Megatron .bin/.idx; megatron_muon/data/corpus.py) and reuses it afterwards.
2. Trains the `cpu-tiny` model (the paper's architecture at d_model 64) twice through `python -m megatron_muon.train`
   (megatron.training, one gloo rank): `--optimizer muon` and `--optimizer adam`, same tokens, same schedule, each
   at its own learning rate, with TensorBoard logs.
3. Prints the loss at fixed token counts, the tokens each optimizer needs to reach a target loss (AdamW's final
   smoothed loss) and their ratio, and writes a plot of loss vs tokens.

Both runs share everything but the optimizer of the hidden matrices: weight decay 0.1, Adam betas (0.9, 0.95) for
AdamW and for Muon's embeddings and norms, warmup then cosine decay to lr / 10. The learning rates are each
optimizer's best on a grid measured on this setup (see the README's quickstart; `--lr-muon`, `--lr-adam` to change).
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?\| lm loss: ([0-9.eE+-]+) \|")


def _train_command(optimizer: str, lr: float, args, tensorboard_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "megatron_muon.train",
        "--model-config", args.model_config, "--optimizer", optimizer, "--use-distributed-optimizer",
        "--lr", str(lr), "--min-lr", str(lr / 10), "--lr-decay-style", "cosine",
        "--lr-warmup-iters", str(max(1, args.iters // 50)), "--weight-decay", "0.1", "--clip-grad", "1.0",
        "--adam-beta1", "0.9", "--adam-beta2", "0.95",
        "--micro-batch-size", str(args.batch), "--global-batch-size", str(args.batch),
        "--train-iters", str(args.iters), "--seed", "1234",
        "--eval-iters", "4", "--eval-interval", str(args.iters),
        "--log-interval", str(args.log_interval),
        "--tensorboard-dir", str(tensorboard_dir), "--tensorboard-log-interval", str(args.log_interval),
        "--data-dir", str(args.data_dir),
    ]


def run(optimizer: str, lr: float, args, progress, task) -> list[tuple[int, float]]:
    """Train one optimizer, streaming its log to a file and its loss to the progress bar; (iteration, loss) list."""
    log_path = args.out / f"{optimizer}.log"
    cmd = _train_command(optimizer, lr, args, args.out / "tensorboard" / optimizer)
    points = []
    with open(log_path, "w") as log, subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            match = ITERATION.search(line)
            if match:
                iteration, loss = int(match.group(1)), float(match.group(3))
                points.append((iteration, loss))
                progress.update(task, completed=iteration, description=f"{optimizer:5s} lr {lr:g}  loss {loss:.3f}")
    if proc.returncode != 0:
        raise SystemExit(f"{optimizer} run failed (exit {proc.returncode}); see {log_path}")
    return points


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-config", default="cpu-tiny")
    parser.add_argument("--iters", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (global = micro batch)")
    parser.add_argument("--lr-muon", type=float, default=1e-2)
    parser.add_argument("--lr-adam", type=float, default=3e-3)
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quickstart")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset cache (default: megatron-muon's)")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from megatron_muon.study.metrics import ema, tokens_to_loss
    from megatron_muon.models.registry import get_model_config
    from megatron_muon.data.corpus import build_dataset, default_data_dir

    console = Console()
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_dir = args.data_dir or default_data_dir()
    console.print(f"[bold]1/3[/] dataset (built on the first run, then reused from {args.data_dir})")
    data = build_dataset(data_dir=args.data_dir)
    console.print(f"    {data.corpus}: {data.train_tokens:,} train tokens, vocab {data.vocab_size}")
    seq = get_model_config(args.model_config).shape.seq_length
    tokens_per_iter = args.batch * seq

    console.print(f"[bold]2/3[/] training {args.model_config} for {args.iters} iterations x {tokens_per_iter} tokens")
    lrs = {"muon": args.lr_muon, "adam": args.lr_adam}
    curves, seconds = {}, {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        for optimizer, lr in lrs.items():
            task = progress.add_task(f"{optimizer:5s} lr {lr:g}", total=args.iters)
            start = time.time()
            curves[optimizer] = run(optimizer, lr, args, progress, task)
            seconds[optimizer] = time.time() - start

    console.print("[bold]3/3[/] results")
    smoothed = {}
    for optimizer, points in curves.items():
        tokens = [i * tokens_per_iter for i, _ in points]
        smoothed[optimizer] = (tokens, ema([loss for _, loss in points]))
    target = max(s[-1] for _, s in smoothed.values())  # the worse final loss: both curves reach it
    table = Table(title=f"{args.model_config}, {tokens_per_iter} tokens/step (smoothed lm loss, EMA 0.95)")
    table.add_column("tokens")
    for optimizer in curves:
        table.add_column(optimizer)
    total = args.iters * tokens_per_iter
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
        at = fraction * total
        row = [f"{at / 1e6:.2f}M"]
        for tokens, losses in smoothed.values():
            i = min(range(len(tokens)), key=lambda k: abs(tokens[k] - at))
            row.append(f"{losses[i]:.3f}")
        table.add_row(*row)
    reach = {opt: tokens_to_loss(t, s, target) for opt, (t, s) in smoothed.items()}
    table.add_row(*[f"to {target:.3f}"] + [f"{reach[o] / 1e6:.2f}M" for o in curves])
    console.print(table)
    ratio = reach["adam"] / reach["muon"] if reach["muon"] > 0 else math.nan
    console.print(f"tokens to reach loss {target:.3f}: AdamW / Muon = {ratio:.2f} "
                  f"(wall: muon {seconds['muon']:.0f} s, adam {seconds['adam']:.0f} s)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (optimizer, points), color in zip(curves.items(), ("tab:red", "tab:blue")):
        tokens, losses = smoothed[optimizer]
        ax.plot(tokens, [loss for _, loss in points], color=color, alpha=0.25, linewidth=0.8)
        ax.plot(tokens, losses, color=color, label=f"{optimizer} (lr {lrs[optimizer]:g})")
    ax.axhline(target, color="gray", linestyle=":", linewidth=0.8)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("lm loss")
    ax.set_title(f"Muon vs AdamW, {args.model_config} on the Python standard library")
    ax.legend()
    fig.tight_layout()
    plot = args.out / "loss_vs_tokens.png"
    fig.savefig(plot, dpi=120)
    console.print(f"plot: {plot}\nlogs: {args.out}/*.log\nTensorBoard: tensorboard --logdir {args.out / 'tensorboard'}")


if __name__ == "__main__":
    main()
