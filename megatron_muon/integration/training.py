"""Training a megatron-core GPT the way megatron.training does, as one object: `Trainer(TrainingSetup(...))`.

    with model_parallel(tensor_parallel=2):
        trainer = Trainer(TrainingSetup(TINY, MuonOptimizerConfig(optimizer="muon", lr=1e-2),
                                        schedule=LRSchedule(decay_steps=100, warmup_steps=10, style="cosine")))
        for step in range(100):
            loss = trainer.step(synthetic_batches(TINY, 2, 4, seed=step))  # None off the last pipeline stage

The trainer builds this pipeline stage's GPT for the current parallel state (optionally in muP: Megatron's muP
fields, then `apply_mup`'s per-matrix init and tags), wraps it in megatron-core's DistributedDataParallel, installs
the plugin and builds the optimizer with megatron-core's `get_megatron_optimizer`: `optimizer="muon"` is the
plugin's Muon, `"nvidia_muon"` megatron-core's own, anything else Megatron's (the muP tags become param-group
overrides either way). A step is megatron.training's: zero the grad buffers, forward and backward through
megatron-core's pipeline schedule, `finalize_model_grads`, `optimizer.step()`, and the LR scheduler after a
successful update. The phases are methods of their own for callers that act between them (write gradients, time
the optimizer step, stop on a diverged loss).

Written against megatron-core 0.19.2 (`get_forward_backward_func`'s arguments, `OptimizerParamScheduler`'s, and
megatron.training's `wrap_model_chunks_with_ddp` for the layer-wise optimizer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from megatron_muon.models.shapes import GPTShape

if TYPE_CHECKING:
    from megatron.core.optimizer import OptimizerConfig


@dataclass
class Batch:
    tokens: torch.Tensor  # [micro_batch, seq]
    labels: torch.Tensor


def token_batches(rows: torch.Tensor, micro_batch: int) -> list[Batch]:
    """Rows of seq_length + 1 tokens as next-token microbatches of `micro_batch` rows each."""
    return [Batch(chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()) for chunk in rows.split(micro_batch)]


def synthetic_batches(shape: GPTShape, micro_batch: int, count: int, seed: int) -> list[Batch]:
    """Deterministic random token batches: the same seed gives the same data on every layout."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        out += token_batches(torch.randint(0, shape.vocab_size, (micro_batch, shape.seq_length + 1), generator=gen),
                             micro_batch)
    return out


def position_ids_and_mask(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPTModel's other two inputs for `tokens` [micro_batch, seq]: positions 0..seq-1 and the causal mask."""
    seq = tokens.shape[1]
    position_ids = torch.arange(seq).unsqueeze(0).expand_as(tokens)
    return position_ids, torch.ones(seq, seq, dtype=torch.bool).triu(1).view(1, 1, seq, seq)


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    per_token_loss = model(batch.tokens, *position_ids_and_mask(batch.tokens), labels=batch.labels)

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


@dataclass(frozen=True)
class MupSetup:
    """muP relative to a base (proxy) model: `preset` (mup.rules.PRESETS) and the base's hidden size; the other
    base widths default to the target's shape ratios (integration/mup.py's base_widths), the base head dim to the
    target's (so the attention scale is the standard 1/sqrt(head_dim) at the base). `embedding_lr_mult` and
    `output_mult` multiply the word embedding's LR and the logits on top of the preset's (mup.MupSpec)."""

    preset: str
    base_hidden: int
    base_head_dim: int | None = None
    base_ffn_hidden: int | None = None
    base_num_query_groups: int | None = None
    embedding_lr_mult: float = 1.0
    output_mult: float = 1.0


@dataclass(frozen=True)
class LRSchedule:
    """Megatron's OptimizerParamScheduler over the optimizer config's lr (peak), min_lr (None: 0) and weight_decay
    (constant): linear warmup from init_lr over warmup_steps, then `style` ("constant", "linear", "cosine",
    "inverse-square-root") down to min_lr at decay_steps. muP groups scale their own peak and floor."""

    decay_steps: int
    warmup_steps: int = 0
    style: str = "constant"
    init_lr: float = 0.0


@dataclass(frozen=True)
class TrainingSetup:
    """What a Trainer builds. `optimizer` is a megatron-core OptimizerConfig (build it as
    integration.flags.MuonOptimizerConfig for the plugin's fields and defaults); its use_distributed_optimizer and
    use_layer_wise_distributed_optimizer also lay out the DDP buffers. `seed`: torch.manual_seed before the model
    is built (the CPU init draws from the default generator); None leaves the generator as it is."""

    shape: GPTShape
    optimizer: OptimizerConfig
    dtype: torch.dtype = torch.float32
    mup: MupSetup | None = None
    schedule: LRSchedule | None = None
    overlap_grad_reduce: bool = False
    bucket_size: int | None = None
    grad_reduce_in_fp32: bool = True
    seed: int | None = None


class Trainer:
    """This rank's model, DDP wrapper, optimizer and scheduler for `setup`, under the current parallel state.

    `init_weights(models)`, if given, may overwrite the freshly built weights in place before DDP and the
    optimizer take their copies. Attributes: `models` (this pipeline stage's unwrapped GPTModel, in a list),
    `model_chunks` (the DDP wrappers the schedule and finalize_model_grads take), `optimizer` (Megatron's
    optimizer: `optimizer.step()` returns (update applied, grad norm, zeros in grad)), `scheduler` (None without a
    schedule), `mup_rules` (parameter name -> muP rule; empty without muP).
    """

    def __init__(self, setup: TrainingSetup, init_weights: Callable[[list], None] | None = None):
        import megatron.core.optimizer as mcore_optimizer

        from megatron_muon.integration import mup
        from megatron_muon.integration.gpt import build_gpt
        from megatron_muon.integration.install import install

        self.setup = setup
        config = setup.optimizer
        install()
        if setup.seed is not None:
            torch.manual_seed(setup.seed)
        fields = {}
        if setup.mup is not None:
            head_dim = setup.mup.base_head_dim or setup.shape.head_dim
            fields = mup.transformer_config_fields(setup.mup.preset, setup.mup.base_hidden, setup.shape.hidden_size,
                                                   head_dim, output_mult=setup.mup.output_mult)
        self.models = [build_gpt(setup.shape, setup.dtype, **fields)]
        self.mup_rules = {}
        if setup.mup is not None:
            base = mup.base_widths(
                mup.target_widths(self.models[0].config), setup.mup.base_hidden, setup.mup.base_ffn_hidden,
                setup.mup.base_head_dim, setup.mup.base_num_query_groups,
            )
            trains_matrices = "muon" if config.optimizer in ("muon", "nvidia_muon") else "adam"
            self.mup_rules = mup.apply_mup(self.models, mup.MupSpec(
                setup.mup.preset, base, trains_matrices, embedding_lr_mult=setup.mup.embedding_lr_mult,
                output_mult=setup.mup.output_mult,
            ))
        if init_weights is not None:
            init_weights(self.models)
        self.model_chunks = self._wrap()
        # Through the module: install() replaced get_megatron_optimizer there.
        self.optimizer = mcore_optimizer.get_megatron_optimizer(config, self.model_chunks)
        self.scheduler = None if setup.schedule is None else self._scheduler(setup.schedule)

    def _wrap(self) -> list:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        setup = self.setup
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=setup.grad_reduce_in_fp32, overlap_grad_reduce=setup.overlap_grad_reduce,
            use_distributed_optimizer=setup.optimizer.use_distributed_optimizer,
            bucket_size=setup.bucket_size,
        )
        if setup.optimizer.use_layer_wise_distributed_optimizer:
            # megatron-core's layer-wise optimizer needs reduce-scattered grads in whole-matrix-aligned buffers,
            # which only megatron.training's wrapper sets up (it also turns on use_distributed_optimizer).
            from megatron.training.training import wrap_model_chunks_with_ddp

            return wrap_model_chunks_with_ddp(self.models, self.models[0].config, ddp_config,
                                              use_layer_wise_distributed_optimizer=True)
        return [DistributedDataParallel(model.config, ddp_config, module=model) for model in self.models]

    def _scheduler(self, schedule: LRSchedule):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        config = self.setup.optimizer
        return OptimizerParamScheduler(
            self.optimizer, init_lr=schedule.init_lr, max_lr=config.lr, min_lr=config.min_lr or 0.0,
            lr_warmup_steps=schedule.warmup_steps, lr_decay_steps=schedule.decay_steps,
            lr_decay_style=schedule.style, start_wd=config.weight_decay, end_wd=config.weight_decay,
            wd_incr_steps=schedule.decay_steps, wd_incr_style="constant",
        )

    @property
    def data_parallel(self) -> tuple[int, int]:
        """(this rank's DP index, DP size): which share of a global batch this rank trains on."""
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    def forward_backward(self, batches: list[Batch]) -> float | None:
        """Zero the gradients, then forward and backward over `batches` (this rank's microbatches of one step)."""
        for chunk in self.model_chunks:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        return forward_backward(self.model_chunks, batches, self.setup.shape)

    def finalize_grads(self) -> None:
        """Megatron's gradient sync: DP reduce (or reduce-scatter), tied-embedding and layer-norm all-reduces."""
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads

        finalize_model_grads(self.model_chunks)

    def optimizer_step(self) -> bool:
        """optimizer.step(), then the scheduler if the update was applied; False: Megatron skipped it on every rank
        (non-finite gradients), as megatron.training leaves the schedule where it was."""
        applied, _, _ = self.optimizer.step()
        if applied and self.scheduler is not None:
            self.scheduler.step(increment=1)
        return applied

    def step(self, batches: list[Batch]) -> float | None:
        """One training step; returns the loss on the last pipeline stage (None elsewhere). Raises if Megatron
        skipped the update (non-finite gradients)."""
        loss = self.forward_backward(batches)
        self.finalize_grads()
        if not self.optimizer_step():
            raise FloatingPointError("non-finite gradients: Megatron skipped the optimizer step")
        return loss

    def evaluate(self, batches: list[Batch]) -> float | None:
        """The loss on `batches` without training (last pipeline stage; None elsewhere)."""
        with torch.no_grad():
            return forward_backward(self.model_chunks, batches, self.setup.shape, forward_only=True)
