"""The learning-rate grid behind `make demo`'s defaults: each optimizer at several learning rates, validation loss.

Every run is exactly the command `examples/quickstart.py` launches (its `_train_command`: `python -m
megatron_muon.train`, the `cpu-tiny` model, warmup then cosine to lr / 10, weight decay 0.1, Adam betas (0.9, 0.95),
one gloo rank, one evaluation at the last iteration), only with `--iters` iterations and one learning rate from the
grid. The score of a run is the last validation lm loss Megatron prints (`validation loss at iteration N on
validation set`, the evaluation after training; every validation line is kept in the JSON).

    python examples/quickstart_lr_grid.py                       # the grid of docs/cluster-launch.md: 2 x 4 runs of 300 iterations
    python examples/quickstart_lr_grid.py --optimizers muon --lrs 3e-3 1e-2 --iters 100
    python examples/quickstart_lr_grid.py ... -- --seq-length 64   # flags after -- go to every training run, last

Prints one table (learning rate x optimizer, best per optimizer marked *) and writes the JSON (`--json`, default
`<out>/lr_grid.json`): the setup, every run's command, validation losses, final training loss, seconds and log
file, and the best learning rate per optimizer. Runs one after another; a failed run is recorded (exit code, log)
and the grid goes on, and the script then exits 1.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quickstart import ITERATION, REPO, _train_command  # noqa: E402  (the quickstart's own training command)

VALIDATION = re.compile(r"validation loss at iteration\s+(\d+)( on validation set)? \| lm loss value: ([0-9.eE+-]+) \|")
DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2)


def parse_log(text: str) -> dict:
    """Validation evaluations and training losses of one megatron.training log."""
    validations = [
        {"iteration": int(m.group(1)), "after_training": bool(m.group(2)), "lm_loss": float(m.group(3))}
        for m in VALIDATION.finditer(text)
    ]
    train = [(int(m.group(1)), float(m.group(3))) for m in ITERATION.finditer(text)]
    return {
        "validation_losses": validations,
        "validation_loss": validations[-1]["lm_loss"] if validations else None,
        "final_train_loss": train[-1][1] if train else None,
        "last_iteration": train[-1][0] if train else None,
    }


def run_one(optimizer: str, lr: float, args) -> dict:
    """One training run of the grid; its parsed result (validation_loss None when it failed)."""
    name = f"{optimizer}-lr{lr:g}"
    log_path = args.out / f"{name}.log"
    cmd = _train_command(optimizer, lr, args, args.out / "tensorboard" / name) + list(args.train_flags)
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    result = {"optimizer": optimizer, "lr": lr, "returncode": proc.returncode, "seconds": round(time.time() - start, 1),
              "log": str(log_path), "command": ["python", *cmd[1:]]}
    result.update(parse_log(log_path.read_text(errors="replace")))
    if proc.returncode != 0 or result["validation_loss"] is None:
        result["validation_loss"] = None
        result["error"] = (f"exit {proc.returncode}" if proc.returncode != 0 else "no validation loss in the log")
    return result


def best_per_optimizer(runs: list[dict]) -> dict:
    best = {}
    for run in runs:
        loss = run["validation_loss"]
        if loss is None or not math.isfinite(loss):
            continue
        if run["optimizer"] not in best or loss < best[run["optimizer"]]["validation_loss"]:
            best[run["optimizer"]] = {"lr": run["lr"], "validation_loss": loss}
    return best


def format_table(runs: list[dict], optimizers: list[str], lrs: list[float], title: str) -> str:
    """Learning rate x optimizer, validation loss to 2 decimals (as docs/cluster-launch.md quotes it), best marked *."""
    best = best_per_optimizer(runs)
    by_key = {(r["optimizer"], r["lr"]): r for r in runs}
    header = ["lr"] + optimizers
    rows = []
    for lr in lrs:
        row = [f"{lr:g}"]
        for optimizer in optimizers:
            run = by_key.get((optimizer, lr))
            if run is None:
                row.append("-")
            elif run["validation_loss"] is None:
                row.append(f"failed ({run['error']})")
            else:
                mark = "*" if best.get(optimizer, {}).get("lr") == lr else " "
                row.append(f"{run['validation_loss']:.2f}{mark}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.append("best: " + (", ".join(f"{o} lr {b['lr']:g} ({b['validation_loss']:.2f})" for o, b in best.items())
                             or "none (every run failed)"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_flags = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_flags = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     epilog="Flags after -- are appended to every training command.")
    parser.add_argument("--optimizers", nargs="+", choices=("muon", "adam"), default=["muon", "adam"])
    parser.add_argument("--lrs", nargs="+", type=float, default=list(DEFAULT_LRS), help="the grid, for every optimizer")
    parser.add_argument("--iters", type=int, default=300, help="training iterations per run")
    parser.add_argument("--model-config", default="cpu-tiny")
    parser.add_argument("--batch", type=int, default=16, help="sequences per step (global = micro batch)")
    parser.add_argument("--log-interval", type=int, default=10)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "quickstart_lr_grid")
    parser.add_argument("--data-dir", type=Path, default=None, help="dataset cache (default: megatron-muon's)")
    parser.add_argument("--json", type=Path, default=None, help="default: <out>/lr_grid.json")
    args = parser.parse_args(argv)
    args.train_flags = train_flags
    if args.iters < 1:
        parser.error("--iters must be >= 1")

    from megatron_muon.data.corpus import default_data_dir

    args.out.mkdir(parents=True, exist_ok=True)
    args.data_dir = args.data_dir or default_data_dir()
    json_path = args.json or args.out / "lr_grid.json"

    runs = []
    total = len(args.optimizers) * len(args.lrs)
    for optimizer in args.optimizers:
        for lr in args.lrs:
            print(f"[{len(runs) + 1}/{total}] {optimizer} lr {lr:g}: {args.iters} iterations ...", flush=True)
            run = run_one(optimizer, lr, args)
            runs.append(run)
            outcome = (f"validation loss {run['validation_loss']:.4f}" if run["validation_loss"] is not None
                       else f"FAILED ({run['error']}), see {run['log']}")
            print(f"    {outcome} ({run['seconds']:.0f} s)", flush=True)

    title = (f"{args.model_config}, {args.iters} iterations of {args.batch} sequences: "
             f"validation lm loss (best per optimizer *)")
    print(format_table(runs, args.optimizers, args.lrs, title))
    summary = {
        "setup": {"model_config": args.model_config, "iters": args.iters, "batch": args.batch,
                  "optimizers": args.optimizers, "lrs": args.lrs, "train_flags": train_flags,
                  "data_dir": str(args.data_dir)},
        "runs": runs,
        "best": best_per_optimizer(runs),
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"json: {json_path}")
    return 1 if any(r["validation_loss"] is None for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
