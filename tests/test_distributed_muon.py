"""The distributed Muon equals one process running the foundation's single-device Muon on the logical model.

For every TP, DP, PP in {1, 2} on at most 4 ranks, fp32 and bf16, overlapped grad reduce on and off, with and
without Megatron's distributed optimizer: 5 steps of the tiny GQA + gated-MLP GPT, then every parameter is
compared with a single-process reference that splits the TP=1 model into its logical matrices (Q, K, V, gate,
up, ...) and trains them with `megatron_muon.muon.Muon` (AdamW on the rest). The reference shares no code with
the distributed path but the layout table and the Newton-Schulz engine, which have their own tests.
"""

import dataclasses
import itertools
import re
import zlib

import numpy as np
import pytest
import torch

from megatron_muon.testing.ranks import run_ranks

pytestmark = pytest.mark.multirank

STEPS = 5
LR, WD = 5e-3, 0.1
MICRO_BATCHES = 2  # per DP rank and step
CONFIGS = [(d, distopt, overlap) for d in ("float32", "bfloat16") for distopt in (False, True) for overlap in (False, True)]
# Relative error bounds (worst parameter, ||W - W_ref|| / ||W_ref||) after STEPS steps; measured maxima over
# all layouts and configs in brackets.
# - synthetic gradients (the same TP=1 gradient sliced onto every layout): only the optimizer differs. fp32
#   [2.6e-8]; bf16 [1.2e-5]: model weights are bf16 roundings of fp32 main weights, and a 1e-8 difference in a
#   main weight (stacked vs single Newton-Schulz GEMMs) can flip an element's rounding by one bf16 ulp.
# - real gradients from the model: TP, DP and PP also change the reduction order of forward and backward, and
#   Newton-Schulz amplifies such noise in weak gradient directions (its slope at zero is 3.4445^5 ~ 480):
#   fp32 [1.4e-6]; bf16 [1.8e-2], where the noise is bf16 rounding of activations, not reduction order.
TOLERANCE = {(True, "float32"): 1e-6, (True, "bfloat16"): 1e-4, (False, "float32"): 1e-5, (False, "bfloat16"): 5e-2}


def _global_name(module, name: str) -> str:
    """Parameter name in the PP=1, EP=1 model: global layer and expert index, and the head tied to the embedding."""
    from megatron.core import parallel_state as ps

    expert = re.search(r"local_experts\.(\d+)\.", name)
    if expert:
        local_experts = module.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
        index = ps.get_expert_model_parallel_rank() * local_experts + int(expert.group(1))
        name = name.replace(expert.group(0), f"local_experts.{index}.")
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if match:
        layer = module.decoder.layers[int(match.group(1))]
        return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"
    return "embedding.word_embeddings.weight" if name == "output_layer.weight" else name


def _logical_pieces(module, tp_rank: int, tp_size: int) -> list:
    """This rank's parameters as (global name, row0, col0, values) pieces of the TP=1 parameters."""
    from megatron_muon.integration.layouts import LayoutOptions, matrix_blocks

    pieces = []
    for name, p in module.named_parameters():
        value = p.detach().float()
        if p.ndim == 2:
            for b in matrix_blocks(name, p, module.config, tp_rank, tp_size, LayoutOptions(False, False)):
                r = b.local
                block = value[r.row0 : r.row0 + r.rows, r.col0 : r.col0 + r.cols]
                pieces.append((_global_name(module, name), b.logical_row0, b.logical_col0, block.numpy().copy()))
        else:
            offset = tp_rank * p.numel() if getattr(p, "tensor_model_parallel", False) else 0
            pieces.append((_global_name(module, name), offset, 0, value.view(-1, 1).numpy().copy()))
    return pieces


def _global_tensor(global_name: str, shape, seed: int, kind: str) -> torch.Tensor:
    """A tensor that depends only on the TP=1 parameter name: the same on every layout."""
    g = torch.Generator().manual_seed(zlib.crc32(global_name.encode()) + 7919 * seed)
    noise = torch.randn(shape, generator=g)
    if kind == "grad":
        return 1e-3 * noise
    # Initial weights: norms near one, matrices at Megatron's init std.
    return 1.0 + 0.1 * noise if len(shape) == 1 else 0.02 * noise


def _write_global(module, tp_rank: int, tp_size: int, seed: int, kind: str) -> None:
    """Write this rank's shard of a name-seeded TP=1 tensor into every parameter (`data`) or its `main_grad`."""
    from megatron_muon.integration.layouts import LayoutOptions, logical_shapes, matrix_blocks

    for name, p in module.named_parameters():
        target = p.main_grad if kind == "grad" else p.data
        global_name = _global_name(module, name)
        if p.ndim == 2:
            (full_shape,) = logical_shapes(name, p, module.config, tp_size, LayoutOptions(False, False)).values()
            full = _global_tensor(global_name, full_shape, seed, kind)
            for b in matrix_blocks(name, p, module.config, tp_rank, tp_size, LayoutOptions(False, False)):
                r, at = b.local, b.to_logical(b.local)
                target[r.row0 : r.row0 + r.rows, r.col0 : r.col0 + r.cols].copy_(
                    full[at.row0 : at.row0 + at.rows, at.col0 : at.col0 + at.cols]
                )
        else:
            shard = p.numel() if getattr(p, "tensor_model_parallel", False) else 0
            full = _global_tensor(global_name, (p.numel() * (tp_size if shard else 1),), seed, kind)
            target.copy_(full[tp_rank * shard : tp_rank * shard + p.numel()])


def _shape(name: str):
    from megatron_muon.models.shapes import TINY

    # MoE: 4 experts, top-2 routing, in place of the gated MLP.
    return TINY if name == "tiny" else dataclasses.replace(TINY, num_experts=4)


def _batches(shape, dp_rank: int, step: int):
    from megatron_muon.integration.training import synthetic_batches

    return synthetic_batches(shape, micro_batch=2, count=MICRO_BATCHES, seed=100 * step + dp_rank)


def _optimizer_config(dtype, distributed: bool):
    from megatron_muon.integration.flags import MuonOptimizerConfig

    return MuonOptimizerConfig(
        optimizer="muon", muon_ns_precision="fp32", lr=LR, weight_decay=WD, bf16=dtype == torch.bfloat16, use_distributed_optimizer=distributed,
        clip_grad=1.0, adam_beta1=0.95, adam_beta2=0.95, adam_eps=1e-8,
        muon_momentum=0.95, muon_nesterov=True, muon_coefficient_type="simple", muon_scale_mode="essential",
    )


def _distributed_runs(tp: int, pp: int, configs=CONFIGS, steps: int = STEPS, shape_name="tiny", ep: int = 1) -> list[dict]:
    """Every config of CONFIGS on this layout, in one process group (imports are the expensive part)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_muon.integration.optimizer import step_stats
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, TrainingSetup

    shape = _shape(shape_name)
    results = []
    for synthetic, (dtype_name, distributed, overlap) in itertools.product((True, False), configs):
        dtype = getattr(torch, dtype_name)
        with model_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=1234, expert_parallel=ep):
            tp_rank = ps.get_tensor_model_parallel_rank()
            # Megatron draws each pipeline stage's weights from its own RNG stream, so PP=2 would start from a
            # different model than PP=1: start every layout from the same name-seeded weights instead.
            trainer = Trainer(
                TrainingSetup(shape, _optimizer_config(dtype, distributed), dtype, overlap_grad_reduce=overlap),
                init_weights=lambda models: _write_global(models[0], tp_rank, tp, -1, "weight"),
            )
            (model,) = trainer.models
            dp_rank, _ = trainer.data_parallel
            orthogonalized, losses = [], []
            for step in range(steps):
                losses.append(trainer.forward_backward(_batches(shape, dp_rank, step)))
                trainer.finalize_grads()
                if synthetic:
                    _write_global(model, tp_rank, tp, step, "grad")
                assert trainer.optimizer_step()
                # Expert matrices are per expert-parallel rank: name them by it.
                ep_rank = ps.get_expert_model_parallel_rank()
                orthogonalized.append(
                    [(ep_rank, n) if "experts" in n else n
                     for stats in step_stats(trainer.optimizer) for n in stats.orthogonalized]
                )
            dp_identical = True
            for expert, group in ((False, ps.get_data_parallel_group()), (True, ps.get_expert_data_parallel_group())):
                flat = torch.cat([p.detach().float().flatten() for p in model.parameters()
                                  if getattr(p, "allreduce", True) != expert] or [torch.zeros(0)])
                replicas = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
                dist.all_gather(replicas, flat, group=group)
                dp_identical &= all(torch.equal(r, replicas[0]) for r in replicas)
            results.append(
                dict(
                    config=(synthetic, dtype_name, distributed, overlap),
                    pieces=_logical_pieces(model, tp_rank, tp),
                    dp_identical=dp_identical,
                    orthogonalized=orthogonalized,
                    stage=ps.get_pipeline_model_parallel_rank(),
                    losses=losses,
                )
            )
    return results


def _reference_runs(dp_sizes, synthetic: bool, steps: int = STEPS, shape_name="tiny") -> dict:
    """Single process, TP=PP=DP=1: the logical model trained with the foundation's single-device optimizers."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_muon.integration.layouts import LayoutOptions, logical_shapes, matrix_blocks
    from megatron_muon.integration.gpt import build_gpt
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import forward_backward
    from megatron_muon.muon import Muon, is_muon_matrix

    shape = _shape(shape_name)
    out = {}
    for dp in dp_sizes:
        for dtype_name in ("float32", "bfloat16"):
            dtype = getattr(torch, dtype_name)
            with model_parallel(seed=1234):
                model = build_gpt(shape, dtype)
                _write_global(model, 0, 1, -1, "weight")
                # Megatron's DDP only as a grad buffer (fp32 grads, like the distributed runs); one rank.
                ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=model)
                # (fused param, its local rectangle, logical matrix, its rectangle there) for every block
                views, logical, adam_masters = [], {}, {}
                for name, p in model.named_parameters():
                    if is_muon_matrix(name, p):
                        for matrix, matrix_shape in logical_shapes(name, p, model.config, 1, LayoutOptions()).items():
                            logical[matrix] = torch.nn.Parameter(torch.zeros(matrix_shape))
                        for b in matrix_blocks(name, p, model.config, 0, 1, LayoutOptions()):
                            views.append((p, b.local, logical[b.matrix], b.to_logical(b.local)))
                    else:
                        adam_masters[p] = torch.nn.Parameter(p.detach().float().clone())

                def rect(t, r):
                    return t[r.row0 : r.row0 + r.rows, r.col0 : r.col0 + r.cols]

                with torch.no_grad():
                    for p, local, lp, at in views:
                        rect(lp, at).copy_(rect(p, local))
                muon = Muon(list(logical.values()), lr=LR, weight_decay=WD, momentum=0.95, nesterov=True,
                            coefficients="jordan", scale_mode="essential", ns_precision="fp32")
                adam = torch.optim.AdamW(list(adam_masters.values()), lr=LR, weight_decay=WD, betas=(0.95, 0.95), eps=1e-8)
                losses = []
                for step in range(steps):
                    ddp.zero_grad_buffer()
                    batches = [b for r in range(dp) for b in _batches(shape, r, step)]
                    losses.append(forward_backward([ddp], batches, shape))
                    if synthetic:
                        _write_global(model, 0, 1, step, "grad")
                    grads = [p.main_grad for p in model.parameters()]
                    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                    clip = min(1.0, 1.0 / (float(norm) + 1e-6))
                    for lp in logical.values():
                        lp.grad = torch.zeros_like(lp)
                    for p, local, lp, at in views:
                        rect(lp.grad, at).copy_(rect(p.main_grad, local) * clip)
                    for p, master in adam_masters.items():
                        master.grad = p.main_grad.float() * clip
                    muon.step()
                    adam.step()
                    with torch.no_grad():
                        for p, local, lp, at in views:
                            rect(p, local).copy_(rect(lp, at))
                        for p, master in adam_masters.items():
                            p.copy_(master)
                out[dp, dtype_name] = {name: p.detach().float().numpy().copy() for name, p in model.named_parameters()}
                out[dp, dtype_name, "losses"] = losses
    return out


@pytest.fixture(scope="module")
def references():
    """Reference runs for synthetic and for real gradients, keyed (synthetic, dp, dtype)."""
    out = {}
    for synthetic in (True, False):
        (runs,) = run_ranks(_reference_runs, 1, ((1, 2), synthetic))
        out.update({(synthetic, *key): value for key, value in runs.items()})
    return out


def _assemble(rank_results: list[dict], config) -> dict[str, np.ndarray]:
    shapes, pieces = {}, []
    for rank in rank_results:
        (run,) = [r for r in rank if r["config"] == config]
        for name, r0, c0, values in run["pieces"]:
            rows, cols = shapes.get(name, (0, 0))
            shapes[name] = (max(rows, r0 + values.shape[0]), max(cols, c0 + values.shape[1]))
            pieces.append((name, r0, c0, values))
    full = {name: np.full(shape, np.nan, dtype=np.float32) for name, shape in shapes.items()}
    for name, r0, c0, values in pieces:
        region = full[name][r0 : r0 + values.shape[0], c0 : c0 + values.shape[1]]
        # Replicas (DP, or the tied head on the last PP stage) must agree bit for bit.
        assert np.isnan(region).all() or np.array_equal(region, values), name
        region[...] = values
    return full


LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2)]


def _check(ranks: list, configs, expected_for, logical_matrices: int) -> None:
    """Every config: parameters equal the reference, DP replicas agree, each logical matrix runs once per step."""
    for synthetic, (dtype_name, distributed, overlap) in itertools.product((True, False), configs):
        config = (synthetic, dtype_name, distributed, overlap)
        params = _assemble(ranks, config)
        expected = expected_for(synthetic, dtype_name)
        assert params.keys() == {k for k in expected if isinstance(k, str)}
        worst = max(
            float(np.linalg.norm(params[n].reshape(expected[n].shape) - expected[n]) / np.linalg.norm(expected[n]))
            for n in params
        )
        assert worst <= TOLERANCE[synthetic, dtype_name], (config, worst)
        runs = [next(r for r in rank if r["config"] == config) for rank in ranks]
        assert all(r["dp_identical"] for r in runs), config
        # Exactly once: per pipeline stage, every logical matrix is orthogonalized by one rank per step.
        for step in range(STEPS):
            names = [(r["stage"], n) for r in runs for n in r["orthogonalized"][step]]
            assert len(names) == len(set(names)) == logical_matrices, (config, step)


@pytest.mark.parametrize("tp,dp,pp", LAYOUTS, ids=[f"tp{t}-dp{d}-pp{p}" for t, d, p in LAYOUTS])
def test_equals_single_process_muon_on_the_logical_model(tp, dp, pp, references):
    ranks = run_ranks(_distributed_runs, tp * dp * pp, (tp, pp))
    # 2 layers x (q, k, v, proj, gate, up, fc2)
    _check(ranks, CONFIGS, lambda synthetic, dtype_name: references[synthetic, dp, dtype_name], 14)


def test_moe_experts_over_expert_parallel_ranks():
    # DP=2 for dense weights; the same two ranks are EP=2 for experts (expert DP=1): two Muon domains at once.
    configs = [("float32", False, False), ("float32", True, True)]
    ranks = run_ranks(_distributed_runs, 2, (1, 1, configs, STEPS, "moe", 2))
    references = {}
    for synthetic in (True, False):
        (runs,) = run_ranks(_reference_runs, 1, ((2,), synthetic, STEPS, "moe"))
        references[synthetic] = runs[2, "float32"]
    # 2 layers x (q, k, v, proj, router) dense, and 2 layers x 4 experts x (gate, up, fc2).
    _check(ranks, configs, lambda synthetic, dtype_name: references[synthetic], 2 * 5 + 2 * 4 * 3)


def _pipelined_runs(tp: int, pp: int) -> list[dict]:
    """The same 3 steps with the step in one group and pipelined in up to 3, per dtype (fp32: Newton-Schulz in fp32,
    bf16: in bf16 with a bf16 wire) and with and without the distributed optimizer: this rank's parameters after
    each run, and the groups its steps ran in."""
    import dataclasses as dc

    from megatron.core import parallel_state as ps

    from megatron_muon.integration.optimizer import step_stats
    from megatron_muon.integration.parallel_state import model_parallel
    from megatron_muon.integration.training import Trainer, TrainingSetup

    shape = _shape("tiny")
    out = []
    for dtype_name, distributed, groups in itertools.product(("float32", "bfloat16"), (False, True), (1, 3)):
        dtype = getattr(torch, dtype_name)
        config = dc.replace(_optimizer_config(dtype, distributed), muon_overlap_groups=groups,
                            muon_ns_precision="fp32" if dtype == torch.float32 else "bf16")
        with model_parallel(tensor_parallel=tp, pipeline_parallel=pp, seed=1234):
            tp_rank = ps.get_tensor_model_parallel_rank()
            trainer = Trainer(TrainingSetup(shape, config, dtype),
                              init_weights=lambda models: _write_global(models[0], tp_rank, tp, -1, "weight"))
            dp_rank, _ = trainer.data_parallel
            ran_in = []
            for step in range(3):
                trainer.forward_backward(_batches(shape, dp_rank, step))
                trainer.finalize_grads()
                assert trainer.optimizer_step()
                ran_in.append(max(stats.groups for stats in step_stats(trainer.optimizer)))
            (model,) = trainer.models
            out.append(dict(config=(dtype_name, distributed, groups), groups=ran_in,
                            params=[p.detach().clone() for p in model.parameters()]))
    return out


PIPELINE_LAYOUTS = [(2, 2, 1), (2, 1, 2), (1, 2, 2)]


@pytest.mark.parametrize("tp,dp,pp", PIPELINE_LAYOUTS, ids=[f"tp{t}-dp{d}-pp{p}" for t, d, p in PIPELINE_LAYOUTS])
def test_pipelined_step_is_bit_identical_to_the_one_group_step(tp, dp, pp):
    ranks = run_ranks(_pipelined_runs, tp * dp * pp, (tp, pp))
    for rank in ranks:
        runs = {r["config"][:2]: {} for r in rank}
        for r in rank:
            runs[r["config"][:2]][r["config"][2]] = r
        for config, by_groups in runs.items():
            one, pipelined = by_groups[1], by_groups[3]
            assert one["groups"] == [1, 1, 1]
            for a, b in zip(one["params"], pipelined["params"]):
                assert torch.equal(a, b), config
    # The pipeline really ran: some rank's step moved and orthogonalized its stacks in more than one group.
    assert any(r["groups"][0] > 1 for rank in ranks for r in rank if r["config"][2] == 3)
