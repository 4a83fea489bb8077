"""The Muon-overhead cost model (benchmarks/overhead_model.py) against a calculation by hand."""

import importlib.util
import pathlib
import sys

import pytest

from megatron_muon.models.registry import ModelConfig, get_model_config
from megatron_muon.models.shapes import GPTShape

_spec = importlib.util.spec_from_file_location(
    "overhead_model", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "overhead_model.py")
om = importlib.util.module_from_spec(_spec)
sys.modules["overhead_model"] = om  # dataclasses look their module up there
_spec.loader.exec_module(om)

RATES = om.Rates(ns_tflops=100.0, ns_source="test", link_gbytes=10.0, link_source="test", nvlink_gbytes=100.0,
                 nvlink_source="test", train_tflops=200.0, train_source="test")
# One layer, d 256, 2 query heads and 1 KV head of 128, ffn 1024: Q, proj 256x256; K, V 128x256; gate, up 1024x256;
# down 256x1024. Vocabulary 1000, tied.
TINY = ModelConfig("tiny", GPTShape(num_layers=1, hidden_size=256, num_attention_heads=2, num_query_groups=1,
                                    ffn_hidden_size=1024, vocab_size=1000, seq_length=64))


def test_the_models_are_the_registrys():
    assert om.MODELS == (get_model_config("3.67b"), get_model_config("4b"))


def test_one_rank_by_hand():
    o = om.muon_overhead(TINY, batch_tokens=4096, gpus=1, rates=RATES)
    # NS, 5 steps, each 4 m^2 n + 2 m^3: Q, proj 2 x 5 x (4*256^2*256 + 2*256^3) = 1,006,632,960;
    # K, V 2 x 5 x (4*128^2*256 + 2*128^3) = 209,715,200;
    # gate, up, down 3 x 5 x (4*256^2*1024 + 2*256^3) = 4,529,848,320.
    ns_flops = 1_006_632_960 + 209_715_200 + 4_529_848_320
    assert o.ns_flops_max_rank == ns_flops
    assert o.ns_ms == pytest.approx(0.05746196)  # 5,746,196,480 FLOP at 100 TFLOP/s
    assert o.exchange_bytes_max_rank == 0 and o.exchange_ms == 0  # one rank holds everything
    # N = matrices 2*256*256 + 2*128*256 + 3*1024*256 + two norms 2*256 + final norm 256 + embedding 1000*256
    # = 1,239,808. Training: 4096 tokens x (6 x 1,239,808 + 12 x 1 x 256 x 64) = 4096 x 7,635,456
    # = 31,274,827,776 FLOP.
    assert o.train_ms == pytest.approx(0.15637414)  # at 200 TFLOP/s
    assert o.muon_share == pytest.approx(0.05746196 / (0.15637414 + 0.05746196))


def test_two_ranks_by_hand():
    o = om.muon_overhead(TINY, batch_tokens=4096, gpus=2, rates=RATES)
    # LPT on NS FLOPs, ties by name then lowest rank: down, gate, up (1,509,949,440 each) go 0, 1, 0; proj, q
    # (503,316,480) go 1, 1 (rank 1 at 2,516,582,400 < 3,019,898,880); k, v (104,857,600) go 1, 1.
    assert o.ns_flops_max_rank == 2 * 1_509_949_440  # rank 0
    # Every matrix is half on each rank: a rank sends its half of each matrix homed elsewhere (gather) and the
    # other half of each matrix it homes back (scatter), in bf16: (homed on 0 + homed on 1) / 2 elements x 2 bytes.
    homed_0, homed_1 = 2 * 262144, 262144 + 2 * 65536 + 2 * 32768
    assert o.exchange_bytes_max_rank == (homed_0 + homed_1) // 2 * 2 == 983_040
    assert o.exchange_ms == pytest.approx(o.exchange_bytes_max_rank / 100e9 * 1e3)  # NVLink inside a node
    assert o.train_ms == pytest.approx(0.15637414 / 2)


def test_auto_method_uses_gram_on_the_mlp_only():
    paper = get_model_config("3.67b")
    standard = om.muon_overhead(paper, 2**22, 8, RATES, "standard")
    auto = om.muon_overhead(paper, 2**22, 8, RATES, "auto")
    # 102 MLP matrices (gate, up, down in 34 layers), all 4:1, save 2/9 of their NS FLOPs each; attention
    # matrices (1:1 and 2:1) are unchanged.
    mlp = 102 * om.orthogonalization_flops(10240, 2560, 5, "jordan", "standard")
    assert standard.ns_flops_max_rank > auto.ns_flops_max_rank
    total_standard = standard.ns_flops_max_rank * 8 / standard.imbalance
    total_auto = auto.ns_flops_max_rank * 8 / auto.imbalance
    assert total_standard - total_auto == pytest.approx(mlp * 2 / 9)
