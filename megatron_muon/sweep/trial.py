"""The embedded default trial: one tiny megatron-core GPT trained on CPU in this process, result as JSON.

    python -m megatron_muon.sweep.trial --width 64 --lr 0.02 --wd 0.1 --optimizer muon \\
        --global-batch 16 --steps 200 --out result.json

The data (`--data`) is the embedded corpus by default: the Python standard library tokenized by
megatron_muon.data.corpus (sentencepiece, built once and cached; or `--corpus PATH...`), cut into sequences of
seq_length + 1 tokens that every step draws without repetition, with a fixed held-out set from the valid split.
`--data markov` is a synthetic language of known entropy instead (every token has `--branching` equally likely
successors, so the best achievable loss is ln(branching)). Either way every step sees a batch the model has
never seen, so its training loss is the paper's "loss on fresh batches" (arXiv 2505.02222, footnote 3). The
result holds that per-step curve as (tokens seen before the step, loss) pairs, a final loss on the held-out set,
the token count and the wall time of the training loop.

Width scales the model the way the paper's family does (Sec. 5.2): hidden = width, fixed head dimension so the
head count grows with width, GQA with half as many K/V groups, gated MLP of 4 x width; depth, sequence length,
batch and steps stay fixed. With `--mup-base-width N0` the model is parametrized by muP relative to width N0
(megatron_muon/integration/mup.py, preset `--mup-preset`, the paper's `essential` by default): per-matrix init,
embedding and logit multipliers, and per-parameter LR / weight decay / Adam eps, so the swept LR and WD are the
base model's and should transfer across widths. Without it (0) the model is in standard parametrization.
`--embedding-lr-mult` and `--output-mult` (muP only) multiply the word embedding's LR and the logits on top of the
preset's, so they can be swept like the LR (1: the preset as it is).

It trains as a user's Megatron run does (megatron_muon/integration/training.py): one gloo rank, megatron-core's
DDP and `get_megatron_optimizer` with the plugin installed, so `--optimizer muon` is the plugin's distributed
Muon (its defaults: Newton-Schulz in bf16, the paper's essential scale, AdamW on embeddings, head and vectors)
and `--optimizer adamw` is Megatron's Adam with decoupled weight decay; muP's per-parameter LR / WD / eps are
param-group overrides. Weight decay skips norms and biases (Megatron's standard param groups). The LR schedule is
Megatron's OptimizerParamScheduler: linear warmup over max(1, steps // 10) steps, step s at (s + 1) / warmup of
the peak, then cosine down to 0.1x the peak, reached on the last step (the first step after the warmup is
already one step into the cosine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HELD_OUT_SEQUENCES = 64


def markov_successors(vocab: int, branching: int, seed: int) -> torch.Tensor:
    """successors[t] = the `branching` tokens that may follow token t, each with probability 1/branching."""
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=gen)[:branching] for _ in range(vocab)])


def sample_sequences(successors: torch.Tensor, count: int, length: int, gen: torch.Generator) -> torch.Tensor:
    vocab, branching = successors.shape
    tokens = torch.empty(count, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (count,), generator=gen)
    for i in range(1, length):
        choice = torch.randint(0, branching, (count,), generator=gen)
        tokens[:, i] = successors[tokens[:, i - 1], choice]
    return tokens


class MarkovData:
    def __init__(self, args):
        self.vocab_size = args.vocab
        self.best_possible_loss = math.log(args.branching)
        self._successors = markov_successors(args.vocab, args.branching, seed=args.data_seed)
        self._length = args.seq_length + 1
        self.held_out = sample_sequences(self._successors, HELD_OUT_SEQUENCES, self._length,
                                         torch.Generator().manual_seed(args.data_seed + 1))
        self._order = torch.Generator().manual_seed(args.data_seed + 2 + args.seed)

    def batch(self, step: int, size: int) -> torch.Tensor:
        return sample_sequences(self._successors, size, self._length, self._order)


def token_windows(prefix: str, length: int) -> torch.Tensor:
    """The documents of a Megatron indexed dataset, concatenated (each ends with EOD) and cut into rows of
    `length` tokens; the tail that does not fill a row is dropped."""
    from megatron_muon.integration.datasets import read_indexed_dataset

    stream = torch.from_numpy(read_indexed_dataset(prefix).astype(np.int64))
    rows = stream.numel() // length
    return stream[: rows * length].view(rows, length)


class CorpusData:
    """Sequences of the embedded (or given) corpus: step s takes the rows s*size .. (s+1)*size - 1 of one seeded
    permutation of the train split's rows, so no sequence is seen twice."""

    def __init__(self, args):
        from megatron_muon.data.corpus import build_dataset

        built = build_dataset(args.corpus or None, data_dir=args.data_dir, vocab_size=args.corpus_vocab_size,
                              max_corpus_bytes=args.corpus_bytes, seq_length=args.seq_length, progress=False)
        self.vocab_size = built.vocab_size
        self.best_possible_loss = None
        length = args.seq_length + 1
        train = token_windows(built.train_prefix, length)
        order = torch.Generator().manual_seed(args.data_seed + args.seed)
        self._train = train[torch.randperm(len(train), generator=order)]
        valid = token_windows(built.valid_prefix, length)
        if len(valid) < HELD_OUT_SEQUENCES:
            raise SystemExit(f"the valid split of {built.corpus} has {len(valid)} sequences of {length} tokens; "
                             f"the held-out set needs {HELD_OUT_SEQUENCES}: give a larger corpus")
        picked = torch.randperm(len(valid), generator=torch.Generator().manual_seed(args.data_seed))
        self.held_out = valid[picked[:HELD_OUT_SEQUENCES]]
        needed = args.steps * args.global_batch
        if needed > len(self._train):
            raise SystemExit(f"{args.steps} steps of {args.global_batch} sequences need {needed} fresh sequences of "
                             f"{length} tokens, but the train split of {built.corpus} has {len(self._train)}: "
                             f"train fewer tokens or give a larger corpus")

    def batch(self, step: int, size: int) -> torch.Tensor:
        return self._train[step * size:(step + 1) * size]


def shape_for_width(width: int, vocab_size: int, args):
    from megatron_muon.models.shapes import GPTShape

    if width % (2 * args.head_dim):
        raise SystemExit(f"--width {width} must be a multiple of 2 x --head-dim = {2 * args.head_dim} (GQA pairs)")
    heads = width // args.head_dim
    return GPTShape(
        num_layers=args.layers, hidden_size=width, num_attention_heads=heads, num_query_groups=heads // 2,
        ffn_hidden_size=4 * width, vocab_size=vocab_size, seq_length=args.seq_length,
    )


def optimizer_config(args):
    """Megatron's optimizer config for the trial: the plugin's Muon (AdamW on embeddings, head and vectors) or
    Megatron's AdamW; both AdamWs with the paper's betas (0.95, 0.95) and eps 1e-8, no gradient clipping, and an LR
    that ends at 0.1x the peak (the paper's schedule, Sec. 2)."""
    from megatron_muon.integration.flags import PAPER_ADAM_BETAS, MuonOptimizerConfig

    return MuonOptimizerConfig(
        optimizer="muon" if args.optimizer == "muon" else "adam", lr=args.lr, min_lr=0.1 * args.lr,
        weight_decay=args.wd, clip_grad=0.0, adam_beta1=PAPER_ADAM_BETAS[0], adam_beta2=PAPER_ADAM_BETAS[1],
        adam_eps=1e-8,
    )


def training_setup(args, shape):
    """What the trial trains: `shape` with the trial's optimizer, schedule and parametrization."""
    from megatron_muon.integration.training import LRSchedule, MupSetup, TrainingSetup

    # Linear warmup over 10% of the steps, then cosine to 0.1x the peak (min_lr): the paper's schedule. Megatron's
    # scheduler needs the decay to outlast the warmup, which a one-step run's does not.
    warmup = max(1, args.steps // 10)
    schedule = LRSchedule(decay_steps=max(args.steps, warmup + 1), warmup_steps=warmup, style="cosine")
    mup = MupSetup(args.mup_preset, args.mup_base_width, embedding_lr_mult=args.embedding_lr_mult,
                   output_mult=args.output_mult) if args.mup_base_width else None
    return TrainingSetup(shape, optimizer_config(args), schedule=schedule, mup=mup)


def train(args) -> dict:
    import torch.distributed as dist

    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, token_batches

    data = (CorpusData if args.data == "corpus" else MarkovData)(args)
    setup = training_setup(args, shape_for_width(args.width, data.vocab_size, args))
    # A file store, not a TCP port: trials started side by side cannot race for the same port.
    with tempfile.TemporaryDirectory() as rendezvous:
        dist.init_process_group("gloo", init_method=f"file://{rendezvous}/store", rank=0, world_size=1)
        try:
            with model_parallel(seed=args.seed):
                trainer = Trainer(setup)
                # Megatron's warmup starts at lr 0 on the first step; one scheduler step ahead, step s trains at
                # (s + 1) / warmup of the peak, so the first step already learns.
                trainer.scheduler.step(increment=1)
                tokens_per_step = args.global_batch * args.seq_length
                curve = []
                start = time.perf_counter()
                for step in range(args.steps):
                    batch = data.batch(step, args.global_batch)
                    loss = trainer.forward_backward(token_batches(batch, len(batch)))
                    curve.append((step * tokens_per_step, loss))
                    if not math.isfinite(loss):
                        break  # diverged: later steps only repeat NaN
                    trainer.finalize_grads()
                    trainer.optimizer_step()
                    if args.log_every and step % args.log_every == 0:
                        print(f"step {step:>6} tokens {step * tokens_per_step:>10} loss {loss:.4f}", flush=True)
                wall_s = time.perf_counter() - start
                final_loss = trainer.evaluate(token_batches(data.held_out, len(data.held_out)))
        finally:
            dist.destroy_process_group()
    return dict(
        final_loss=final_loss,
        curve=curve,
        tokens=len(curve) * tokens_per_step,
        wall_s=wall_s,
        steps=len(curve),
        tokens_per_step=tokens_per_step,
        best_possible_loss=data.best_possible_loss,
        config={name: str(value) if isinstance(value, Path) else value for name, value in vars(args).items()},
    )


def write_atomically(path: Path, payload: dict) -> None:
    """A reader (the sweep runner, maybe after a crash) sees either no file or the whole file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, required=True, help="hidden size")
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--wd", type=float, default=0.1, help="coupled weight decay (W -= lr * wd * W)")
    parser.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    parser.add_argument("--global-batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seq-length", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=16)
    parser.add_argument("--data", choices=("corpus", "markov"), default="corpus")
    parser.add_argument("--corpus", nargs="+", help="corpus files or directories (default: the Python stdlib)")
    parser.add_argument("--corpus-bytes", type=int, help="cap on the corpus (default: data.py's stdlib sample)")
    parser.add_argument("--corpus-vocab-size", type=int, default=512, help="of the sentencepiece tokenizer built")
    parser.add_argument("--data-dir", type=Path, help="dataset cache (default: $MEGATRON_MUON_DATA_DIR or ~/.cache)")
    parser.add_argument("--vocab", type=int, default=256, help="markov: vocabulary size")
    parser.add_argument("--branching", type=int, default=4, help="markov: successors per token")
    parser.add_argument("--seed", type=int, default=1234, help="model init and data order")
    parser.add_argument("--data-seed", type=int, default=0, help="the held-out set (and the Markov language)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--mup-base-width", type=int, default=0,
                        help="muP base width N0 (LR and WD are the base model's); 0: standard parametrization")
    parser.add_argument("--mup-preset", default="essential", help="muP preset (megatron_muon.mup.rules.PRESETS)")
    parser.add_argument("--embedding-lr-mult", type=multiplier, default=1.0,
                        help="muP: the word embedding's (and tied head's) LR times this, on top of the preset's")
    parser.add_argument("--output-mult", type=multiplier, default=1.0,
                        help="muP: the logits times this, on top of the preset's output multiplier")
    parser.add_argument("--out", type=Path, required=True, help="result JSON, written atomically at the end")
    args = parser.parse_args(argv)
    if not args.mup_base_width:
        for flag in ("--embedding-lr-mult", "--output-mult"):
            if getattr(args, flag[2:].replace("-", "_")) != 1.0:
                parser.error(f"{flag} multiplies a muP multiplier; it needs muP (--mup-base-width N), and standard "
                             f"parametrization has none to multiply")
    return args


def multiplier(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number > 0")
    return value


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    write_atomically(args.out, train(args))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
