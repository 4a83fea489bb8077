"""`make demo`: Muon vs AdamW on a small Megatron GPT, on CPU, in about a minute.

The model is megatron-core's own GPTModel (GQA, gated MLP, RMSNorm, RoPE, tied embeddings) run as one gloo
rank with the project's CPU shims. The data is a synthetic language whose entropy is known: every token has
exactly `--branching` equally likely successors, so the best achievable loss is ln(branching).

Both optimizers run the same learning-rate grid with the same weight decay and schedule (warmup, cosine to 0.1x):
Muon's 0.2 * sqrt(max(m, n)) update scale is meant to make AdamW's settings carry over (arXiv 2505.02222,
Sec. 2.1), so the grid shows whether the best learning rates line up as well as which optimizer gets lower.
Muon trains the hidden matrices; embeddings and norms use AdamW (beta1 = beta2 = 0.95, eps 1e-8) in both.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megatron_muon.testing.ranks import run_ranks


def markov_language(vocab: int, branching: int, seed: int) -> torch.Tensor:
    """successors[t] = the `branching` tokens that may follow token t."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=g)[:branching] for _ in range(vocab)])


def sample(successors: torch.Tensor, batch: int, length: int, g: torch.Generator) -> torch.Tensor:
    vocab, branching = successors.shape
    tokens = torch.empty(batch, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
    for i in range(1, length):
        choice = torch.randint(0, branching, (batch,), generator=g)
        tokens[:, i] = successors[tokens[:, i - 1], choice]
    return tokens


def train(optimizer_name: str, lr: float, args) -> dict:
    from megatron_muon.megatron.models import GPTShape, build_gpt
    from megatron_muon.megatron.parallel import model_parallel
    from megatron_muon.muon import ADAMW_DEFAULTS, MuonWithAdamW

    shape = GPTShape(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=4 * args.hidden, vocab_size=args.vocab, seq_length=args.seq,
    )
    successors = markov_language(args.vocab, args.branching, seed=0)
    held_out = sample(successors, 64, args.seq + 1, torch.Generator().manual_seed(1))
    with model_parallel(seed=args.seed):
        model = build_gpt(shape)
        if optimizer_name == "muon":
            opt = MuonWithAdamW.for_model(model, lr=lr, weight_decay=args.wd)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.wd, **ADAMW_DEFAULTS)
        warmup = args.steps // 10
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: (s + 1) / warmup if s < warmup
            else 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / (args.steps - warmup))),
        )
        seq = args.seq
        positions = torch.arange(seq).unsqueeze(0)
        causal = torch.ones(seq, seq, dtype=torch.bool).triu(1).view(1, 1, seq, seq)

        def loss_on(tokens):
            return model(tokens[:, :-1], positions, causal, labels=tokens[:, 1:]).float().mean()

        g = torch.Generator().manual_seed(2)
        curve, start = {}, time.perf_counter()
        for step in range(args.steps + 1):
            if step % args.eval_every == 0:
                with torch.no_grad():
                    model.eval()
                    curve[step] = float(loss_on(held_out))
                    model.train()
            if step == args.steps:
                break
            opt.zero_grad()
            loss_on(sample(successors, args.batch, seq + 1, g)).backward()
            opt.step()
            schedule.step()
        return dict(curve=curve, seconds=time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-every", type=int, default=30)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2, 3e-2])
    parser.add_argument("--wd", type=float, default=0.1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--branching", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()

    # One process runs the whole grid: megatron-core's import costs more than a run.
    runs = run_ranks(sweep, 1, (args,))[0]
    floor = math.log(args.branching)
    print(f"\nheld-out loss (nats) after {args.steps} steps; best achievable ln({args.branching}) = {floor:.3f}, "
          f"uniform guess ln({args.vocab}) = {math.log(args.vocab):.3f}")
    print(f"{'lr':>8} {'AdamW':>8} {'Muon':>8} {'Muon - AdamW':>13}")
    for lr in args.lrs:
        a, m = (runs[name, lr]["curve"][args.steps] for name in ("adamw", "muon"))
        print(f"{lr:>8.0e} {a:>8.3f} {m:>8.3f} {m - a:>+13.3f}")
    best = {name: min(args.lrs, key=lambda lr: runs[name, lr]["curve"][args.steps]) for name in ("adamw", "muon")}
    print(f"\nlearning curves at each optimizer's best lr (AdamW {best['adamw']:.0e}, Muon {best['muon']:.0e})")
    print(f"{'step':>6} {'AdamW':>8} {'Muon':>8}")
    for step in runs["adamw", best["adamw"]]["curve"]:
        print(f"{step:>6} {runs['adamw', best['adamw']]['curve'][step]:>8.3f} {runs['muon', best['muon']]['curve'][step]:>8.3f}")
    for name in ("adamw", "muon"):
        seconds = sum(runs[name, lr]["seconds"] for lr in args.lrs) / len(args.lrs)
        print(f"{name:>6}: {1000 * seconds / args.steps:.1f} ms per step (CPU, one thread)")


def sweep(args) -> dict:
    return {(name, lr): train(name, lr, args) for name in ("adamw", "muon") for lr in args.lrs}


if __name__ == "__main__":
    main()
