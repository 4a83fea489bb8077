"""`python -m megatron_muon.launch <script> --optimizer muon` trains an unmodified Megatron script end to end.

The script is examples/pretrain_gpt_cpu.py (a plain `megatron.training.pretrain` GPT script with no megatron_muon
import), run on CPU with gloo: one process, and two processes under torchrun (TP=2, and DP=2 with the
distributed optimizer). Each run must exit 0, print Megatron's iteration lines with the lm loss falling, and
show that the plugin built the optimizer:

- the plugin logs its plan ("megatron-muon: 14 dense logical matrices ... each orthogonalized once") and the
  argument dump names the optimizer the user chose;
- Megatron's own builders never ran: with --logging-level 20 they log "Setting up optimizer with config" /
  "Setting up emerging optimizer with config", and those lines are absent (DDP's INFO line proves the level);
- --use-distributed-optimizer stayed Megatron's DistributedOptimizer: Megatron's argument dump shows
  use_distributed_optimizer True and use_layer_wise_distributed_optimizer False (stock validate_args rewrites
  muon + distributed optimizer to the layer-wise one).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_muon.testing.ranks import free_port

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "pretrain_gpt_cpu.py"
TRAIN_ITERS = 20
RUN_TIMEOUT = 180  # seconds per run; a hung collective fails the test instead of the suite

# A tiny GQA + SwiGLU GPT on mock data, with every CUDA-only fusion off (the flags a CPU run needs).
TRAIN_FLAGS = [
    "--optimizer", "muon", "--use-distributed-optimizer",
    "--distributed-backend", "gloo", "--distributed-timeout-minutes", "2",
    "--transformer-impl", "local", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--make-vocab-size-divisible-by", "64",
    "--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
    "--group-query-attention", "--num-query-groups", "2", "--swiglu", "--normalization", "RMSNorm",
    "--disable-bias-linear", "--position-embedding-type", "rope", "--untie-embeddings-and-output-weights",
    "--attention-dropout", "0", "--hidden-dropout", "0",
    "--seq-length", "32", "--max-position-embeddings", "32", "--micro-batch-size", "2",
    "--train-iters", str(TRAIN_ITERS), "--lr", "1e-2", "--min-lr", "1e-3", "--lr-decay-style", "cosine",
    "--lr-warmup-iters", "2", "--weight-decay", "0.1", "--clip-grad", "1.0", "--seed", "1234",
    "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1", "--logging-level", "20",
]

ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?\| lm loss: ([0-9.eE+-]+) \|")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",  # the CPU path even on a GPU machine: the launcher then applies the CPU shims
        OMP_NUM_THREADS="1",
        # Megatron demands this with TP > 1 on pre-Blackwell devices, and the CPU shims report the CPU as one.
        CUDA_DEVICE_MAX_CONNECTIONS="1",
        **extra,
    )
    return env


def _run(cmd: list[str], env: dict[str, str], timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run in a new session and kill the whole group on timeout, so torchrun's ranks cannot outlive a hang."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n--- output tail ---\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _check_training_log(log: str) -> None:
    iterations = [(int(i), int(n), float(loss)) for i, n, loss in ITERATION.findall(log)]
    assert [i for i, _, _ in iterations] == list(range(1, TRAIN_ITERS + 1)), log[-6000:]
    first, last = iterations[0][2], iterations[-1][2]
    assert last < first - 1.0, f"lm loss did not fall: {first} -> {last}"

    assert re.search(r"megatron-muon: 14 dense logical matrices over \d ranks .* each orthogonalized once", log), \
        "the plugin did not build the optimizer: Megatron did not route --optimizer muon to it"
    assert re.search(r"^ +optimizer \.+ muon$", log, re.M)
    assert "Setting up DistributedDataParallel with config" in log  # INFO logging is on ...
    assert "Setting up optimizer with config" not in log  # ... and Megatron's own builders stayed idle
    assert "Setting up emerging optimizer with config" not in log
    assert re.search(r"^ +use_distributed_optimizer \.+ True$", log, re.M)
    assert re.search(r"^ +use_layer_wise_distributed_optimizer \.+ False$", log, re.M)


def _launcher(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_muon.launch", *args]


def test_no_arguments_prints_usage_and_exits_2():
    result = _run(_launcher(), _env(), timeout=60)
    assert result.returncode == 2
    assert "python -m megatron_muon.launch pretrain_gpt.py --optimizer muon" in result.stdout


def test_missing_script_exits_with_a_clear_message(tmp_path):
    missing = tmp_path / "no_such_script.py"
    result = _run(_launcher(str(missing), "--optimizer", "muon"), _env(), timeout=60)
    assert result.returncode == 1
    assert f"megatron_muon.launch: no such training script: {missing}" in result.stdout


@pytest.mark.multirank
def test_single_process_trains_with_muon():
    env = _env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))  # what torchrun would set
    result = _run(_launcher(str(SCRIPT), *TRAIN_FLAGS), env)
    assert result.returncode == 0, result.stdout[-6000:]
    _check_training_log(result.stdout)


@pytest.mark.multirank
@pytest.mark.parametrize("parallel", [["--tensor-model-parallel-size", "2"], []], ids=["tp2", "dp2"])
def test_torchrun_two_ranks_train_with_muon(parallel):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           "-m", "megatron_muon.launch", str(SCRIPT), *TRAIN_FLAGS, *parallel]
    result = _run(cmd, _env())
    assert result.returncode == 0, result.stdout[-6000:]
    _check_training_log(result.stdout)
    world = re.search(r"^ +data_parallel_size \.+ (\d+)$", result.stdout, re.M)
    assert world and int(world.group(1)) == (1 if parallel else 2)
