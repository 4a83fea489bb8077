"""The op counter of benchmarks/step_ops.py, and what it shows about the plugin's step: a constant number of ops
however many matrices a model has (foreach update rules, an exchange compiled into a few gathers), and no host
synchronization beyond the deliberate non-finite-update agreement."""

import importlib.util
import json
import pathlib
import random
import sys

import pytest
import torch

from megatron_muon.runtime.exchange import PADDING, RunGather

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


step_ops = _load("step_ops")


def test_the_counter_counts_every_op_and_names_host_syncs_by_its_rule():
    x = torch.tensor([1.0, -2.0, 3.0])
    counter = step_ops.OpCounter()
    with counter:
        y = x + 1
        x.sum().item()  # _local_scalar_dense
        x[x > 0]  # a boolean mask: a hidden nonzero
        torch.repeat_interleave(torch.tensor([1, 2]))  # output size from device data
        torch.repeat_interleave(torch.tensor([1, 2]), output_size=3)  # told the size: no sync
        torch.nonzero(y)
    summary = counter.summary()
    assert summary["aten_ops"] == sum(v for k, v in summary["by_kind"].items() if k.startswith("aten."))
    assert summary["by_kind"]["aten.add"] == 1
    syncs = summary["host_syncs_by_op"]
    assert set(syncs) <= {"aten._local_scalar_dense", "aten.nonzero", "aten.repeat_interleave", "aten.index"}
    assert syncs["aten._local_scalar_dense"] == syncs["aten.repeat_interleave"] == 1
    # The mask and torch.nonzero: the mask counts as an index by a bool tensor, or as the nonzero it lowers to.
    assert syncs["aten.nonzero"] + syncs.get("aten.index", 0) == 2
    assert summary["host_syncs"] == 4


def _element_wise(out_pos, src_pos, lengths, n, source):
    out = torch.empty(n)
    for o, s, length in zip(out_pos.tolist(), src_pos.tolist(), lengths.tolist()):
        out[o : o + length] = source[s : s + length]
    return out


@pytest.mark.parametrize("seed", range(40))
def test_a_gather_compiled_from_runs_equals_copying_run_by_run(seed):
    """The exchange's gathers: blocks read as windows, blocks across a run boundary element by element."""
    rng = random.Random(seed)
    n = rng.choice([0, 1, 63, 64, 65, 130, 700])
    cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 12)))) if n > 1 else []
    bounds = [0, *cuts, n] if n else []
    runs = list(zip(bounds, [b - a for a, b in zip(bounds, bounds[1:])]))
    # Runs placed in the source in a shuffled order, with gaps; in order and without gaps for every third seed, so
    # that consecutive runs continue each other and merge.
    order = list(range(len(runs)))
    if seed % 3:
        rng.shuffle(order)
    src, cursor = {}, rng.randint(0, 10)
    for i in order:
        src[i] = cursor
        cursor += runs[i][1] + (rng.randint(0, 10) if seed % 3 else 0)
    source_numel = cursor + rng.randint(0, 10)
    out_pos = torch.tensor([o for o, _ in runs], dtype=torch.int64)
    lengths = torch.tensor([length for _, length in runs], dtype=torch.int64)
    src_pos = torch.tensor([src[i] for i in range(len(runs))], dtype=torch.int64)
    shuffle = torch.randperm(len(runs), generator=torch.Generator().manual_seed(seed))
    gather = RunGather(out_pos[shuffle], src_pos[shuffle], lengths[shuffle], n, source_numel, torch.device("cpu"))
    source = torch.randn(source_numel + PADDING, generator=torch.Generator().manual_seed(seed))
    out = gather(source)
    assert out.numel() >= n + PADDING  # padded like every buffer a gather reads
    assert torch.equal(out[:n], _element_wise(out_pos, src_pos, lengths, n, source))
    # A few bytes of index per block, not 4 per element.
    assert gather.index_bytes <= 4 * (n // 64 + 2) + 12 * 64 * len(runs)


@pytest.mark.parametrize("out_pos,lengths,n", [([0, 4], [5, 3], 8), ([0, 6], [5, 3], 9), ([0], [5], 6)])
def test_a_gather_refuses_runs_that_do_not_tile_its_output(out_pos, lengths, n):
    with pytest.raises(ValueError, match="exactly once"):
        RunGather(torch.tensor(out_pos), torch.tensor([0, 20])[: len(out_pos)], torch.tensor(lengths), n, 40,
                  torch.device("cpu"))


@pytest.mark.multirank
def test_the_plugins_share_of_a_step_does_not_grow_with_the_model(tmp_path, capsys, monkeypatch):
    # The rank process imports the counting function by its module's name, from the path it inherits.
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    out = tmp_path / "step_ops.json"
    result = step_ops.main(["--rows", "muon", "muon wrapper", "--layers", "2", "4", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["layers"] == [2, 4] and result["dtype"] == "bf16" and result["ranks"] == 1
    assert "aten._local_scalar_dense" in result["host_sync_rule"]
    ours, wrapper = result["rows"]["muon"], result["rows"]["muon wrapper"]
    for row in (ours, wrapper):
        assert set(row["by_layers"]) == {"2", "4"}
        for counts in row["by_layers"].values():
            assert {"aten_ops", "view_ops", "collectives", "host_syncs", "host_syncs_by_op", "by_kind",
                    "state_bytes", "index_bytes"} <= counts.keys()
            assert counts["aten_ops"] > 0 and counts["state_bytes"] > 0
            assert counts["aten_ops"] == sum(v for k, v in counts["by_kind"].items() if k.startswith("aten."))
    # Two more layers add 8 matrices (14 logical ones) of shapes the smaller model already has: the same stacks,
    # groups and peers, so the plugin's own ops stay exactly the same; only Megatron's wrapper grows.
    assert ours["inner_ops"]["2"] == ours["inner_ops"]["4"] > 0
    assert ours["inner_ops_per_layer"] == 0
    assert ours["aten_ops_per_layer"] == wrapper["aten_ops_per_layer"] > 0
    for n in ("2", "4"):
        mine, megatron = ours["by_layers"][n], wrapper["by_layers"][n]
        # One host sync and one collective of its own: agree_finite's flag all-reduce and its read.
        assert mine["host_syncs"] == megatron["host_syncs"] + 1
        assert set(mine["host_syncs_by_op"]) == {"aten._local_scalar_dense"}
        assert mine["collectives"] == megatron["collectives"] + 1
        # The compiled exchange's indices are small beside the optimizer state (element-wise ones were 4x it).
        assert 0 < mine["index_bytes"] <= mine["state_bytes"] / 8
    printed = capsys.readouterr().out
    assert "muon wrapper" in printed and f"wrote {out}" in printed
