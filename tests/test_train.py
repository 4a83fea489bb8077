"""`python -m megatron_muon.train`: megatron.training with the plugin, a named model config and the embedded data
builder, on CPU; and its refusals of bad input before any training starts."""

import math
import re
import sys

import pytest

from megatron_muon.testing.ranks import free_port
from tests.test_data import _python_document
from tests.test_launch import _env, _run

ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?\| lm loss: ([0-9.eE+-]+) \|")
SMALL = ["--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
         "--global-batch-size", "2", "--lr", "3e-3", "--eval-iters", "0", "--eval-interval", "1000",
         "--log-interval", "1", "--logging-level", "20", "--use-distributed-optimizer", "--optimizer", "muon"]


@pytest.fixture
def corpus(tmp_path):
    import random

    rng = random.Random(1)
    root = tmp_path / "corpus"
    root.mkdir()
    for index in range(16):
        (root / f"mod_{index:02d}.py").write_text(_python_document(rng, index))
    return root


def _train(*flags: str, ranks: int = 1):
    if ranks == 1:
        cmd = [sys.executable, "-m", "megatron_muon.train", *flags]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "megatron_muon.train", *flags]
    return _run(cmd, _env(), timeout=300)


@pytest.mark.multirank
def test_two_steps_with_tp2_on_a_built_corpus(corpus, tmp_path):
    result = _train("--model-config", "cpu-tiny", "--corpus", str(corpus), "--corpus-vocab-size", "400",
                    "--data-dir", str(tmp_path / "data"), "--tensor-model-parallel-size", "2", "--train-iters", "2",
                    *SMALL, ranks=2)
    assert result.returncode == 0, result.stdout[-6000:]
    assert re.search(r"megatron-muon: data .*corpus.*: [\d,]+ train / [\d,]+ valid tokens, vocab 400", result.stdout)
    assert re.search(r"^ +tensor_model_parallel_size \.+ 2$", result.stdout, re.M)
    assert re.search(r"^ +hidden_size \.+ 64$", result.stdout, re.M)  # cpu-tiny's
    assert "megatron-muon: 14 dense logical matrices over 2 ranks (TP 2 x DP 1)" in result.stdout
    losses = [float(m.group(3)) for m in ITERATION.finditer(result.stdout)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    # ln(vocab) at initialization: the model reads the built tokenizer's 400-token vocabulary (padded to 512).
    assert abs(losses[0] - math.log(512)) < 0.5, losses


@pytest.mark.parametrize("flags,message", [
    (["--corpus", "/no/such/corpus"], r"/no/such/corpus"),
    (["--seq-length", "100000", "--max-position-embeddings", "100000"], r"sequence length 100000 needs"),
    (["--model-config", "7b"], r"unknown model config '7b'"),
    (["--corpus", "{corpus}", "--mock-data"], r"--corpus builds the dataset"),
])
def test_bad_input_fails_before_training(flags, message, corpus, tmp_path):
    flags = [f.replace("{corpus}", str(corpus)) for f in flags]
    if "--corpus" not in flags and "--model-config" not in flags:
        flags += ["--corpus", str(corpus)]
    result = _train("--corpus-vocab-size", "400", "--data-dir", str(tmp_path / "data"), "--train-iters", "1",
                    "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2", *flags)
    assert result.returncode != 0
    assert re.search(message, result.stdout), result.stdout[-3000:]
    assert "iteration        1/" not in result.stdout
    assert not (tmp_path / "data").exists() or not any(
        p.name.startswith("corpus") or p.suffix == ".bin" for p in (tmp_path / "data").rglob("*") if "building" in p.name
    )


def test_batch_not_divisible_by_micro_batch_times_dp_is_refused(corpus, tmp_path):
    result = _train("--model-config", "cpu-tiny", "--corpus", str(corpus), "--corpus-vocab-size", "400",
                    "--data-dir", str(tmp_path / "data"), "--train-iters", "1", *SMALL, "--global-batch-size", "3")
    assert result.returncode != 0
    assert re.search(r"\(3\) must be divisible by \w+ \(2\) \* data_parallel_size \(1\)", result.stdout), \
        result.stdout[-3000:]


@pytest.mark.parametrize("optimizer", ["muon", "adam"])
def test_mup_flags_reach_the_model_and_the_optimizer(optimizer, corpus, tmp_path):
    """--use-mup with a base of half the width: the paper's preset for Muon; for Adam only with --mup-preset."""
    preset = [] if optimizer == "muon" else ["--mup-preset", "essential"]
    result = _train("--model-config", "cpu-tiny", "--corpus", str(corpus), "--corpus-vocab-size", "400",
                    "--data-dir", str(tmp_path / "data"), "--train-iters", "2", *SMALL, "--optimizer", optimizer,
                    "--use-mup", "--mup-base-hidden-size", "32", "--mup-base-num-query-groups", "1", *preset)
    assert result.returncode == 0, result.stdout[-6000:]
    trains = "muon" if optimizer == "muon" else "adam"
    assert re.search(rf"megatron-muon: muP preset essential for {trains}, base ModelWidths\(hidden=32, ffn_hidden=\d+, "
                     rf"num_heads=1, num_query_groups=1, head_dim=32", result.stdout), result.stdout[-6000:]
    # apply_mup checked that the TransformerConfig carries the preset's multipliers (logits 1/sqrt(2), not 1/2).
    assert "embedding x1.414, logits x0.7071" in result.stdout
    losses = [float(m.group(3)) for m in ITERATION.finditer(result.stdout)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
