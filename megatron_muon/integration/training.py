"""One training step of a Megatron GPT through megatron-core's own pipeline schedules (any PP size)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_muon.models.shapes import GPTShape


@dataclass
class Batch:
    tokens: torch.Tensor  # [micro_batch, seq]
    labels: torch.Tensor


def synthetic_batches(shape: GPTShape, micro_batch: int, count: int, seed: int) -> list[Batch]:
    """Deterministic random token batches: the same seed gives the same data on every layout."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        tokens = torch.randint(0, shape.vocab_size, (micro_batch, shape.seq_length + 1), generator=gen)
        out.append(Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return out


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    seq = batch.tokens.shape[1]
    position_ids = torch.arange(seq).unsqueeze(0).expand_as(batch.tokens)
    causal_mask = torch.ones(seq, seq, dtype=torch.bool).triu(1).view(1, 1, seq, seq)
    per_token_loss = model(batch.tokens, position_ids, causal_mask, labels=batch.labels)

    def loss_func(output):
        loss = output.float().mean()
        # clone: the schedule divides the returned loss by the microbatch count in place.
        return loss, {"lm loss": loss.detach().clone()}

    return per_token_loss, loss_func


def forward_backward(model_chunks: list, microbatches: list[Batch], shape: GPTShape, forward_only: bool = False):
    """Run the schedule on `microbatches`; returns the mean LM loss on the last stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    losses = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iter(microbatches),
        model=model_chunks,
        num_microbatches=len(microbatches),
        seq_length=shape.seq_length,
        micro_batch_size=microbatches[0].tokens.shape[0],
        forward_only=forward_only,
    )
    if not parallel_state.is_pipeline_last_stage():
        return None
    return float(torch.stack([d["lm loss"] for d in losses]).mean())
