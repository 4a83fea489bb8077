"""Cluster planning on CPU: dry runs for 1, 16 and 128 nodes, the layout rule, the memory estimate's scaling,
bad requests, the launched command's flags against megatron.training's parser, and the shell scripts (with
stand-ins for srun and scontrol)."""

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_muon import cluster
from megatron_muon.cluster import GIB, Layout, LayoutError, choose_layout, estimate_memory, parse_tokens, plan_run
from megatron_muon.models.registry import get_model_config

REPO = Path(__file__).resolve().parents[1]
M = 2**20


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize(
    "nodes, batch, layout, steps_per_rank",
    [
        (1, "1M", (1, 1, 8), 16),
        (16, "8M", (1, 1, 128), 8),
        (128, "16M", (1, 1, 1024), 2),
        # 128 sequences on 1024 GPUs: only TP x PP = 8 keeps DP at 128, and 10 KV heads allow TP <= 2.
        (128, "1M", (2, 4, 128), 1),
    ],
)
def test_dry_run_prints_layout_tokens_memory_and_command(capsys, nodes, batch, layout, steps_per_rank):
    cluster.main(["--model", "4b", "--optimizer", "muon", "--nodes", str(nodes), "--batch-tokens", batch,
                  "--lr", "3e-3", "--ns-precision", "fp8", "--dry-run"])
    out = capsys.readouterr().out
    tp, pp, dp = layout
    assert f"layout       TP={tp} PP={pp} DP={dp}, micro-batch 1, {steps_per_rank} micro-batch(es)" in out
    tokens = parse_tokens(batch)
    assert f"tokens/step  {tokens:,} ({tokens // 8192} sequences)" in out
    assert "memory/GPU   weights" in out and "GiB (estimate; budget 67.7 GiB)" in out
    command = shlex.split(out.split("command      ")[1].split("\n")[0])
    train = command[command.index("megatron_muon.train") + 1 :]
    assert (_flag(train, "--tensor-model-parallel-size"), _flag(train, "--pipeline-model-parallel-size")) == (
        str(tp), str(pp))
    assert _flag(train, "--global-batch-size") == str(tokens // 8192)
    assert _flag(train, "--muon-ns-precision") == "fp8" and "--bf16" in train
    assert _flag(train, "--train-iters") == str(-(-50 * 10**9 // tokens))  # the paper's 50B tokens for its 4B
    if nodes == 1:
        assert command[:2] == ["torchrun", "--standalone"]
    else:
        assert _flag(command, "--nnodes") == str(nodes)
        assert _flag(command, "--rdzv-endpoint") == "${MASTER_ADDR}:${MASTER_PORT}"
    assert ("CUDA_DEVICE_MAX_CONNECTIONS=1" in out) == (tp > 1)
    assert ("--sequence-parallel" in train) == (tp > 1)
    assert ("pipeline bubble" in out) == (pp > 1)


def test_the_rule_prefers_data_parallelism_then_tensor_over_pipeline():
    config = get_model_config("4b")
    layout, _ = choose_layout(config, gpus=16, global_batch_tokens=8 * M, optimizer="adam")
    assert (layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel) == (1, 1, 16)
    # 192 sequences on 128 GPUs: DP 128 does not divide, TP=2 (DP 64, 3 micro-batches each) comes before PP=2.
    layout, _ = choose_layout(config, gpus=128, global_batch_tokens=3 * M // 2, optimizer="adam")
    assert (layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel) == (2, 1, 64)
    assert layout.micro_batches_per_step == 3
    # Fixing TP=1 leaves pipeline stages as the only way to shrink DP.
    layout, _ = choose_layout(config, gpus=128, global_batch_tokens=3 * M // 2, optimizer="adam", tensor_parallel=1)
    assert (layout.tensor_parallel, layout.pipeline_parallel, layout.data_parallel) == (1, 2, 64)


def test_memory_forces_model_parallelism_when_one_gpu_cannot_hold_it():
    config = get_model_config("4b")
    # Two 8192-token sequences per micro-batch do not fit one H100 unsplit; TP=2 halves activations and weights.
    layout, memory = choose_layout(config, gpus=8, global_batch_tokens=1 * M, optimizer="muon", micro_batch_size=2)
    assert (layout.tensor_parallel, layout.pipeline_parallel) == (2, 1)
    unsplit = estimate_memory(config, Layout(1, 1, 8, 2, 128), "muon")
    assert unsplit.total > cluster.MEMORY_BUDGET_FRACTION * cluster.H100_MEMORY_GIB * GIB > memory.total


def test_memory_estimate_scales_as_its_terms_say():
    config = get_model_config("3.67b")
    base = estimate_memory(config, Layout(1, 1, 8, 1, 128), "adam")
    assert base.weights == pytest.approx(2 * config.parameter_count(), rel=1e-6)  # all but the final norm
    assert base.grads == pytest.approx(2 * base.weights)
    assert base.optimizer == pytest.approx(12 * config.parameter_count() / 8, rel=1e-6)
    tp2 = estimate_memory(config, Layout(2, 1, 4, 1, 128), "adam")
    for term in ("weights", "grads", "activations", "logits"):
        assert getattr(tp2, term) == pytest.approx(getattr(base, term) / 2)
    assert tp2.optimizer == pytest.approx(base.optimizer)  # 1/TP of the params over 1/2 the DP ranks
    muon = estimate_memory(config, Layout(1, 1, 8, 1, 128), "muon")
    assert muon.optimizer < base.optimizer and muon.muon_workspace > 0 == base.muon_workspace
    # 1F1B: two stages with one micro-batch each hold half the layers' activations, with two in flight all of them.
    assert estimate_memory(config, Layout(1, 2, 64, 1, 64), "adam").activations == pytest.approx(base.activations / 2)
    assert estimate_memory(config, Layout(1, 2, 4, 1, 128), "adam").activations == pytest.approx(base.activations)
    mbs2 = estimate_memory(config, Layout(1, 1, 8, 2, 128), "adam")
    assert mbs2.activations == pytest.approx(2 * base.activations)
    assert 20 * GIB < base.activations < 40 * GIB  # ~100 KB per token per layer at d_model 2560


@pytest.mark.parametrize(
    "request_args, message",
    [
        (dict(nodes=16, batch_tokens=3 * M // 2, tensor_parallel=1, pipeline_parallel=1),
         "global batch of 192 sequences is not divisible by DP x micro-batch = 128 x 1 = 128"),
        (dict(nodes=1, batch_tokens=M, micro_batch_size=3),
         "global batch of 128 sequences is not divisible by DP x micro-batch = 8 x 3 = 24"),
        (dict(nodes=1, batch_tokens=M + 1), "not a whole number of 8192-token sequences"),
        (dict(nodes=1, batch_tokens=M, tensor_parallel=4), "20 query / 10 KV heads do not split over tensor"),
        (dict(nodes=1, batch_tokens=M, micro_batch_size=16, tensor_parallel=1, pipeline_parallel=1),
         r"needs \d+\.\d GiB per GPU, over the 67.7 GiB budget"),
        (dict(nodes=128, batch_tokens=M, model="3.67b"), "keep at most 128 data-parallel ranks busy"),
    ],
)
def test_impossible_requests_say_why(request_args, message):
    args = dict(model="4b", optimizer="muon", lr=1e-3) | request_args
    with pytest.raises(LayoutError, match=message):
        plan_run(**args)


def test_bad_command_lines_exit_with_a_message():
    with pytest.raises(SystemExit, match="no layout of 1024 GPUs"):
        cluster.main(["--model", "3.67b", "--optimizer", "adam", "--nodes", "128", "--batch-tokens", "1M",
                      "--lr", "1e-3", "--dry-run"])
    with pytest.raises(SystemExit, match="the paper gives no training length for 0.67b"):
        cluster.main(["--model", "0.67b", "--optimizer", "adam", "--batch-tokens", "1M", "--lr", "1e-3", "--dry-run"])
    with pytest.raises(ValueError, match="not a token count"):
        parse_tokens("8MB")
    assert parse_tokens("1.5M") == 3 * M // 2 and parse_tokens("8192") == 8192


def test_launch_execs_torchrun_with_the_extra_flags_last(monkeypatch, capsys):
    launched = {}
    monkeypatch.setattr(os, "execvpe", lambda file, args, env: launched.update(file=file, args=args, env=env))
    monkeypatch.setenv("MASTER_ADDR", "node001")
    cluster.main(["--model", "3.67b", "--optimizer", "adam", "--nodes", "2", "--batch-tokens", "2M", "--lr", "1e-3",
                  "--train-iters", "100", "--wandb-project", "muon", "--data-path", "/data/dclm", "--", "--seed", "7"])
    args = launched["args"]
    assert launched["file"] == "torchrun" and _flag(args, "--rdzv-endpoint") == "node001:29500"
    assert args[-2:] == ["--seed", "7"]
    assert _flag(args, "--wandb-project") == "muon" and _flag(args, "--wandb-exp-name") == "3.67b-adam-2M"
    assert _flag(args, "--data-path") == "/data/dclm" and _flag(args, "--train-iters") == "100"
    assert _flag(args, "--optimizer") == "adam" and "--muon-ns-precision" not in args
    monkeypatch.delenv("MASTER_ADDR")
    with pytest.raises(SystemExit, match="needs --rdzv-endpoint or MASTER_ADDR"):
        cluster.main(["--model", "4b", "--optimizer", "muon", "--nodes", "2", "--batch-tokens", "2M", "--lr", "1e-3"])


@pytest.mark.parametrize("optimizer", ["muon", "adam"])
def test_planned_flags_are_megatron_flags(optimizer):
    """Every planned flag exists in megatron.training (with the plugin's flags) and parses to the plan."""
    from megatron.training.arguments import add_megatron_arguments

    from megatron_muon.integration.flags import add_muon_arguments

    plan = plan_run("3.67b", optimizer, nodes=16, batch_tokens=8 * M, lr=2e-3, wandb_project="p")
    train = plan.command[plan.command.index("megatron_muon.train") + 1 :]
    model_config = _flag(train, "--model-config")
    assert model_config == "3.67b"
    megatron_flags = [a for a in train if a not in ("--model-config", model_config)]
    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    add_muon_arguments(parser)
    args = parser.parse_args([*get_model_config(model_config).megatron_flags(), *megatron_flags])
    assert (args.global_batch_size, args.micro_batch_size, args.optimizer) == (1024, 1, optimizer)
    assert (args.lr, args.min_lr, args.lr_decay_style) == (2e-3, 2e-4, "cosine")
    assert args.bf16 and args.use_distributed_optimizer and args.save_interval == 1000
    assert args.tensorboard_dir == "checkpoints/tensorboard" and args.wandb_project == "p"
    assert args.train_iters == -(-20_000 * 2**23 // (8 * M))  # the paper's 20,000 steps of 8M tokens


def _stub(directory: Path, name: str, body: str):
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)


def test_sbatch_script_plans_then_starts_one_launcher_per_node(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # The real scontrol may write its host list in several pieces; a reader that stops after the first line
    # (`| head -n 1` under pipefail) then ends the job with SIGPIPE. The pause makes that deterministic.
    _stub(bin_dir, "scontrol", 'echo gpu-a01; sleep 0.2; printf "gpu-a%02d\\n" $(seq 2 16)\n')
    _stub(bin_dir, "srun", f'echo "$@" > {tmp_path}/srun.args\n')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[01-16]",
               SLURM_JOB_NUM_NODES="16", SLURM_SUBMIT_DIR=str(REPO), LR="3e-3", BATCH_TOKENS="4M",
               PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path / "run"))
    result = subprocess.run(["bash", str(REPO / "launch" / "muon_4b.sbatch"), "--seed", "3"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "layout       TP=1 PP=1 DP=128" in result.stdout
    assert "--rdzv-endpoint gpu-a01:29500" in result.stdout
    srun = (tmp_path / "srun.args").read_text().split()
    assert srun[:3] == ["--ntasks-per-node=1", "--kill-on-bad-exit=1", sys.executable]
    assert srun[-3:] == ["--", "--seed", "3"] and "--dry-run" not in srun
    assert _flag(srun, "--model") == "4b" and _flag(srun, "--save-dir") == f"{tmp_path}/run/checkpoints"


def test_scripts_refuse_to_start_without_a_learning_rate(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LR"} | dict(MODEL="4b", OPTIMIZER="muon")
    result = subprocess.run(["bash", str(REPO / "launch" / "torchrun_single_node.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "set LR, the peak learning rate" in result.stderr


def test_single_node_script_dry_run(tmp_path):
    env = dict(os.environ, MODEL="3.67b", OPTIMIZER="adam", LR="1e-3", DRY_RUN="1", PYTHON=sys.executable,
               OUTPUT_DIR=str(tmp_path))
    result = subprocess.run(["bash", str(REPO / "launch" / "torchrun_single_node.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "torchrun --standalone --nproc-per-node 8 -m megatron_muon.train --model-config 3.67b" in result.stdout


def test_sweep_submits_both_optimizers_for_every_batch_size(tmp_path):
    env = dict(os.environ, MODEL="3.67b", LR_MUON="3e-3", LR_ADAM="1e-3", DRY_RUN="1")
    result = subprocess.run(["bash", str(REPO / "launch" / "submit_batch_sweep.sh")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 10
    assert "sbatch --nodes 32 --job-name adamw-3.67b-16M --export ALL,LR=1e-3,BATCH_TOKENS=16M "\
           "launch/adamw_3.67b.sbatch" in lines
    for line in lines:
        assert (REPO / line.split()[-1]).is_file()
