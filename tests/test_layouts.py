"""TP shards map onto the logical matrices Muon orthogonalizes: reassembled TP=2 equals TP=1, and the split is
the one the model computes with (megatron-core 0.19.2)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megatron_muon.integration.layouts import LayoutOptions, logical_shapes, matrix_blocks
from megatron_muon.models.shapes import TINY, GPTShape
from megatron_muon.testing.ranks import run_ranks

SEED = 1234
SEQ, BATCH = 5, 2
# name -> (shape, TransformerConfig overrides). MHA with kv_channels != hidden / heads; MQA has fewer query
# groups than TP ranks at TP=2, so a shard holds part of a group and Megatron all-gathers the QKV output.
MODELS = {
    "tiny": (TINY, {}),
    "mha_kv24": (GPTShape(num_layers=1, num_query_groups=4), {"kv_channels": 24}),
    "mqa": (GPTShape(num_layers=1, num_query_groups=1), {}),
}
SPLITS = {True: LayoutOptions(), False: LayoutOptions(split_qkv=False, split_glu=False)}


def _scatter(blocks, shapes, local, mats):
    """Write each block of `local` into its logical matrix; count the writes per element."""
    for name, shape in shapes.items():
        mats.setdefault(name, (torch.zeros(shape, dtype=local.dtype), torch.zeros(shape, dtype=torch.int32)))
    for b in blocks:
        dst = b.to_logical(b.local)
        values, counts = mats[b.matrix]
        rows, cols = slice(dst.row0, dst.row0 + dst.rows), slice(dst.col0, dst.col0 + dst.cols)
        src = local[b.local.row0 : b.local.row0 + b.local.rows, b.local.col0 : b.local.col0 + b.local.cols]
        values[rows, cols] = src
        counts[rows, cols] += 1
    return mats


def _hidden(hidden_size: int) -> torch.Tensor:
    return torch.randn(SEQ, BATCH, hidden_size, generator=torch.Generator().manual_seed(SEED))


def _layouts_under_tp1_and_tp2() -> dict:
    """Per model and TP degree: this rank's scattered logical matrices and layer 0's Q/K/V and MLP outputs."""
    from megatron.core import parallel_state

    from megatron_muon.integration.gpt import build_gpt
    from megatron_muon.integration.parallel_state import model_parallel

    out = {}
    for tp in (1, 2):  # TP=1 runs as two identical DP replicas, so one spawn serves both degrees
        for key, (shape, overrides) in MODELS.items():
            with model_parallel(tensor_parallel=tp, seed=SEED):
                model = build_gpt(shape, **overrides)
                tp_rank = parallel_state.get_tensor_model_parallel_rank()
                matrices = {}
                for split, options in SPLITS.items():
                    mats = {}
                    for name, p in model.named_parameters():
                        if p.dim() != 2 or "embedding" in name or "output_layer" in name:
                            continue
                        blocks = matrix_blocks(name, p, model.config, tp_rank, tp, options)
                        _scatter(blocks, logical_shapes(name, p, model.config, tp, options), p.detach(), mats)
                    # numpy, not tensors: torch would pass tensors through shared memory of an exiting process.
                    matrices[split] = {m: (v.numpy(), c.numpy()) for m, (v, c) in mats.items()}
                layer = model.decoder.layers[0]
                x = _hidden(shape.hidden_size)
                with torch.no_grad():
                    q, k, v = layer.self_attention.get_query_key_value_tensors(x)
                    mlp_out, mlp_bias = layer.mlp(x)
                assert mlp_bias is None
                outputs = {n: t.numpy() for n, t in dict(q=q, k=k, v=v, mlp=mlp_out).items()}
                out[tp, key] = dict(matrices=matrices, outputs=outputs, kv_channels=model.config.kv_channels)
    return out


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_layouts_under_tp1_and_tp2, 2)


def _combined(ranks, tp, key, split):
    """Logical matrices summed over the ranks of one TP group, with per-element write counts."""
    out = {}
    for r in ranks[:tp]:
        for m, (values, counts) in r[tp, key]["matrices"][split].items():
            v, c = torch.from_numpy(values), torch.from_numpy(counts)
            if m in out:
                out[m] = (out[m][0] + v, out[m][1] + c)
            else:
                out[m] = (v, c)
    return out


@pytest.mark.multirank
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("key", list(MODELS))
def test_tp2_reassembles_to_tp1(ranks, key, split):
    tp1, tp2 = _combined(ranks, 1, key, split), _combined(ranks, 2, key, split)
    assert tp1.keys() == tp2.keys()
    for m in tp1:
        assert torch.all(tp1[m][1] == 1), f"{m}: TP=1 writes each element exactly once"
        assert torch.all(tp2[m][1] == 1), f"{m}: TP=2 ranks together write each element exactly once"
        assert torch.equal(tp2[m][0], tp1[m][0]), m


@pytest.mark.multirank
def test_logical_shapes_of_tiny(ranks):
    def shapes(split):
        return {m: tuple(v.shape) for m, (v, _) in _combined(ranks, 2, "tiny", split).items() if ".layers.0." in m}

    layer = "decoder.layers.0."
    qkv, fc1 = layer + "self_attention.linear_qkv.weight", layer + "mlp.linear_fc1.weight"
    common = {layer + "self_attention.linear_proj.weight": (64, 64), layer + "mlp.linear_fc2.weight": (64, 128)}
    assert shapes(True) == {
        **common, qkv + ":q": (64, 64), qkv + ":k": (32, 64), qkv + ":v": (32, 64),
        fc1 + ":gate": (128, 64), fc1 + ":up": (128, 64),
    }
    assert shapes(False) == {**common, qkv: (128, 64), fc1: (256, 64)}


@pytest.mark.multirank
@pytest.mark.parametrize("key", list(MODELS))
def test_split_is_what_the_model_computes(ranks, key):
    shape = MODELS[key][0]
    single = ranks[0][1, key]
    mats = {m: torch.from_numpy(v) for m, (v, _) in single["matrices"][True].items()}
    qkv, mlp = "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.0.mlp."
    heads, groups, kv = shape.num_attention_heads, shape.num_query_groups, single["kv_channels"]
    x = _hidden(shape.hidden_size)
    # get_query_key_value_tensors returns [seq, batch, heads, kv_channels] before RoPE (TINY has no QK norm).
    expected = dict(
        q=(x @ mats[qkv + ":q"].T).view(SEQ, BATCH, heads, kv),
        k=(x @ mats[qkv + ":k"].T).view(SEQ, BATCH, groups, kv),
        v=(x @ mats[qkv + ":v"].T).view(SEQ, BATCH, groups, kv),
        mlp=(F.silu(x @ mats[mlp + "linear_fc1.weight:gate"].T) * (x @ mats[mlp + "linear_fc1.weight:up"].T))
        @ mats[mlp + "linear_fc2.weight"].T,
    )
    for n, want in expected.items():
        torch.testing.assert_close(torch.from_numpy(single["outputs"][n]), want, msg=f"TP=1 {n}")
    # Each TP=2 rank computes its query heads and its (or its group's) K/V head from the same logical matrices.
    for t, r in enumerate(ranks):
        got = {n: torch.from_numpy(a) for n, a in r[2, key]["outputs"].items()}
        h = heads // 2
        torch.testing.assert_close(got["q"], expected["q"][:, :, t * h : (t + 1) * h], msg=f"TP=2 rank {t} q")
        g0 = t * groups // 2 if groups >= 2 else 0
        g1 = g0 + max(groups // 2, 1)
        for n in "kv":
            torch.testing.assert_close(got[n], expected[n][:, :, g0:g1], msg=f"TP=2 rank {t} {n}")
        torch.testing.assert_close(got["mlp"], expected["mlp"], msg=f"TP=2 rank {t} mlp")


# Pure layout tests: stand-ins for the parameter and the config (only attributes are read).


def _param(rows, cols, dim=None, stride=1):
    p = torch.empty(rows, cols, device="meta")
    if dim is not None:
        p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, dim, stride
    return p


def _config(heads=4, groups=2, kv=16, hidden=64, glu=True, output_gate=False):
    return SimpleNamespace(
        num_attention_heads=heads, num_query_groups=groups, kv_channels=kv, hidden_size=hidden,
        gated_linear_unit=glu, attention_output_gate=output_gate,
    )


def _reassemble(name, shards, config, options, dim=0, stride=1):
    """Scatter every TP rank's shard through matrix_blocks; return logical matrices and write counts."""
    tp = len(shards)
    mats = {}
    for t, local in enumerate(shards):
        p = _param(*local.shape, dim=dim, stride=stride)
        blocks = matrix_blocks(name, p, config, t, tp, options)
        _scatter(blocks, logical_shapes(name, p, config, tp, options), local, mats)
    for m, (_, counts) in mats.items():
        assert torch.all(counts == 1), m
    return {m: v for m, (v, _) in mats.items()}


@pytest.mark.parametrize(
    "heads,groups,kv,tp",
    [(4, 2, 16, 1), (4, 2, 16, 2), (8, 8, 8, 4), (8, 4, 4, 2), (4, 1, 8, 2), (8, 2, 4, 4), (8, 2, 4, 8)],
)
def test_qkv_split_matches_per_group_reshape(heads, groups, kv, tp):
    cols, per_group = 3, heads // groups
    fused = torch.arange((heads + 2 * groups) * kv * cols, dtype=torch.float32).view(-1, cols)
    by_group = fused.view(groups, per_group + 2, kv, cols)
    name = "decoder.layers.3.self_attention.linear_qkv.weight"
    config = _config(heads, groups, kv)
    got = _reassemble(name, fused.chunk(tp), config, LayoutOptions())
    assert torch.equal(got[name + ":q"], by_group[:, :per_group].reshape(-1, cols))
    assert torch.equal(got[name + ":k"], by_group[:, per_group].reshape(-1, cols))
    assert torch.equal(got[name + ":v"], by_group[:, per_group + 1].reshape(-1, cols))
    assert torch.equal(_reassemble(name, fused.chunk(tp), config, LayoutOptions(split_qkv=False))[name], fused)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_glu_split_matches_stride_two_sharding(tp):
    ffn, cols = 8, 3
    master = torch.arange(2 * ffn * cols, dtype=torch.float32).view(2 * ffn, cols)  # TP=1 [gate; up]
    # What _initialize_affine_weight_cpu does with stride 2: chunks of ffn/tp rows, rank t takes t and t + tp.
    chunks = master.split(ffn // tp)
    shards = [torch.cat(chunks[t::tp]) for t in range(tp)]
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    got = _reassemble(name, shards, _config(), LayoutOptions(), stride=2)
    assert torch.equal(got[name + ":gate"], master[:ffn]) and torch.equal(got[name + ":up"], master[ffn:])
    assert torch.equal(_reassemble(name, shards, _config(), LayoutOptions(split_glu=False), stride=2)[name], master)


def test_plain_column_row_and_replicated_weights():
    full = torch.arange(6 * 4, dtype=torch.float32).view(6, 4)
    config = _config(glu=False)
    fc1, proj = "x.linear_fc1.weight", "x.linear_proj.weight"
    assert torch.equal(_reassemble(fc1, full.chunk(2), config, LayoutOptions())[fc1], full)
    assert torch.equal(_reassemble(proj, full.chunk(2, dim=1), config, LayoutOptions(), dim=1)[proj], full)
    for t in range(2):  # replicated: every TP rank holds the whole matrix
        (block,) = matrix_blocks("router.weight", _param(6, 4), config, t, 2, LayoutOptions())
        assert (block.logical_row0, block.logical_col0, block.local.rows, block.local.cols) == (0, 0, 6, 4)


def test_qkv_split_that_does_not_divide_names_the_flag():
    name = "decoder.layers.0.self_attention.linear_qkv.weight"
    # 4 heads in 2 groups of kv 16 need 128 rows; a 120-row TP=1 weight cannot be cut into Q, K, V.
    with pytest.raises(ValueError, match=r"120 local rows x TP 1(.|\n)*need 128 rows(.|\n)*--muon-no-split-qkv"):
        matrix_blocks(name, _param(120, 64, dim=0), _config(), 0, 1, LayoutOptions())
    with pytest.raises(ValueError, match=r"120 rows(.|\n)*need 128 rows(.|\n)*--muon-no-split-qkv"):
        matrix_blocks(name, _param(60, 64, dim=0), _config(), 1, 2, LayoutOptions())
    with pytest.raises(ValueError, match="--muon-no-split-qkv"):
        logical_shapes(name, _param(48, 64, dim=0), _config(heads=3, groups=2), 1, LayoutOptions())
    # Unsplit, the fused weight is one matrix whatever the config says.
    unsplit = LayoutOptions(split_qkv=False)
    assert logical_shapes(name, _param(60, 64, dim=0), _config(), 2, unsplit) == {name: (120, 64)}


def test_odd_glu_rows_name_the_flag():
    with pytest.raises(ValueError, match=r"even number of rows(.|\n)*got 7(.|\n)*--muon-no-split-glu"):
        matrix_blocks("mlp.linear_fc1.weight", _param(7, 4, dim=0, stride=2), _config(), 0, 2, LayoutOptions())


def test_unhandled_layouts_raise():
    qkv = "self_attention.linear_qkv.weight"
    with pytest.raises(NotImplementedError, match="attention_output_gate"):
        matrix_blocks(qkv, _param(192, 64, dim=0), _config(output_gate=True), 0, 1, LayoutOptions())
    with pytest.raises(NotImplementedError, match="partition_stride 2"):
        matrix_blocks("mlp.linear_fc2.weight", _param(64, 64, dim=1, stride=2), _config(), 0, 2, LayoutOptions())
    with pytest.raises(NotImplementedError, match="partition_stride 2"):  # stride 2 without a GLU
        fc1 = _param(64, 64, dim=0, stride=2)
        matrix_blocks("mlp.linear_fc1.weight", fc1, _config(glu=False), 0, 2, LayoutOptions())
    with pytest.raises(NotImplementedError, match="--muon-no-split-qkv"):
        matrix_blocks("cross_attention.linear_kv.weight", _param(64, 64, dim=0), _config(), 0, 1, LayoutOptions())
    with pytest.raises(NotImplementedError, match="column-parallel"):
        matrix_blocks(qkv, _param(128, 32, dim=1), _config(), 0, 2, LayoutOptions())
    with pytest.raises(ValueError, match="2-D"):
        matrix_blocks("final_layernorm.weight", torch.empty(64, device="meta"), _config(), 0, 1, LayoutOptions())
