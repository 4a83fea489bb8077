"""One-shot GPU acceptance (`make gpu-check`): the GPU checks of issue 14 as one script, one JSON and one log.

    python benchmarks/gpu_check.py                      # full run on a CUDA machine (<= 8 min), CPU subset elsewhere
    python benchmarks/gpu_check.py --device cpu --train-iters 4 --optimizers muon adam --ns-repeats 1  # smallest

Four parts, each with its own time budget, run in fresh processes (a hung or crashed part is killed at its budget
and recorded; the next part still runs):

  newton_schulz  the Newton-Schulz benchmark (benchmarks/orthogonalize.py) on the paper's 3.67B layer shapes with
                 every method, precision and coefficient set, its error columns on the small shapes, and the FP8
                 GEMMs of both backends (torch._scaled_mm, Transformer Engine) against fp64. CPU: tiny shapes.
  training       `python -m megatron_muon.train` on a paper config (0.20b, Transformer Engine layer spec, bf16) for
                 30 iterations with the plugin's Muon, NVIDIA's Muon and Megatron's AdamW: iteration time and the
                 optimizer's share of it, from megatron.training's own timers. CPU: cpu-tiny, a few iterations.
  cuda_graph     a CUDA graph capture of the plugin's optimizer step (Megatron's wrapper, then the inner optimizer
                 alone) on one NCCL rank: captured or the error, replay time if captured. CPU: skipped.
  op_counts      kernels launched inside one optimizer step from the CUDA profiler, per optimizer, beside
                 benchmarks/step_ops.py's dispatcher op counts. CPU: the profiler's CPU view and step_ops.py.

Writes results/gpu-check-<device>.json and results/gpu-check-<device>.log (every command and its full output).
Exit status 0 when every part expected on this device ran ("ok"), 1 otherwise. Nothing that did not run has a
number: a part or piece that could not run records why.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import math
import os
import pathlib
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
# The script runs from a bare checkout, like the other benchmarks.
sys.path.insert(0, str(REPO))
from megatron_muon.models.registry import get_model_config  # noqa: E402  (no megatron import)
from megatron_muon.newton_schulz import METHODS  # noqa: E402

OPTIMIZERS = ("muon", "nvidia_muon", "adam")
PARTS = ("newton_schulz", "training", "cuda_graph", "op_counts")
# Seconds per part on a GPU: together under the 8 minutes with room for the parent's own start-up. The
# CPU subset takes a minute or two on two cores; its budgets only stop a hang.
GPU_BUDGETS = {"newton_schulz": 150, "training": 170, "cuda_graph": 45, "op_counts": 95}
CPU_BUDGETS = {"newton_schulz": 90, "training": 180, "cuda_graph": 0, "op_counts": 120}
PAPER_SEQ_LENGTH = 8192
# Iterations that pay for cuBLAS heuristics, allocator growth and first-call compilation; left out of the medians.
WARMUP_ITERATIONS = 3
# orthogonalize.py's smallest shape set (up to 1024x4096) takes minutes per precision on two CPU cores; these take
# seconds and still cover square, wide (Gram under `auto`), tall (the transposed path) and a stack.
TINY_NS_SHAPES = {"64x64": (1, 64, 64), "48x192": (1, 48, 192), "192x48": (1, 192, 48),
                  "stack [2,32,64]": (2, 32, 64)}
# Optimizer-step workers (cuda_graph, op_counts): the step's kernel count depends on how many tensors there are,
# not on their width, so the narrowest paper config (34 layers, like every paper config) stands for all of them;
# the sequence only has to produce gradients.
STEP_MODEL = {"cuda": ("0.07b", 256), "cpu": ("cpu-tiny", 32)}
STEP_WARMUP = 2  # optimizer steps before measuring: the first creates the optimizer state
PROFILE_TOP_KERNELS = 15


# ---- pure helpers (unit-tested) --------------------------------------------------------------------------------
def device_slug(name: str) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise ValueError(f"device name {name!r} has no letters or digits to name a file after")
    return slug


def combine(pieces: dict[str, dict]) -> str:
    """A part's status from its pieces': ok when each ran or was not meant to run here, failed when none ran."""
    statuses = [p["status"] for p in pieces.values()]
    if not statuses:
        raise ValueError("a part needs at least one piece")
    if all(s in ("ok", "skipped") for s in statuses):
        return "ok"
    return "partial" if "ok" in statuses else "failed"


def exit_code(parts: dict[str, dict]) -> int:
    """0 when every part expected on this device is ok; a part not expected here (skipped) does not count."""
    return 0 if all(p["status"] == "ok" for p in parts.values() if p["expected"]) else 1


_ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*?elapsed time per iteration \(ms\): ([\d.]+) \|(.*)$")
_LOSS = re.compile(r"lm loss: ([^ |]+)")
_TIMER = re.compile(r"^\s+([\w-]+) \.+: \(([\d.]+), ([\d.]+)\)\s*$")
_ARG = re.compile(r"^\s+(\w+) \.{3,} (.+?)\s*$")


def parse_training_log(text: str) -> dict:
    """megatron.training's log with --log-interval 1 --timing-log-level 1 --logging-level 20: one record per
    iteration (its time, loss and the timers printed after it, max over ranks) and the arguments it printed."""
    iterations: list[dict] = []
    arguments: dict[str, str] = {}
    for line in text.splitlines():
        if m := _ITERATION.search(line):
            loss = _LOSS.search(m.group(4))
            iterations.append(dict(iteration=int(m.group(1)), of=int(m.group(2)), ms=float(m.group(3)),
                                   loss=float(loss.group(1)) if loss else None, timers={}))
        elif (m := _TIMER.match(line)) and iterations:
            # megatron.training prints an iteration's timers after its line: they belong to the last one seen.
            iterations[-1]["timers"][m.group(1)] = float(m.group(3))
        elif not iterations and (m := _ARG.match(line)):
            arguments[m.group(1)] = m.group(2)
    return dict(iterations=iterations, arguments=arguments)


def summarize_training(parsed: dict, train_iters: int) -> dict:
    """Medians over the iterations after WARMUP_ITERATIONS, and whether the run logged what it had to."""
    its = parsed["iterations"]
    measured = its[WARMUP_ITERATIONS:] if len(its) > WARMUP_ITERATIONS else its[-1:]
    problems = []
    if len(its) != train_iters:
        problems.append(f"logged {len(its)} of {train_iters} iterations")
    if not measured or any("optimizer" not in r["timers"] for r in measured):
        problems.append("megatron.training's 'optimizer' timer is missing")
    losses = [r["loss"] for r in its]
    if not losses or any(v is None or not math.isfinite(v) for v in losses):
        problems.append(f"non-finite or missing lm loss: {losses}")
    out = dict(iterations_logged=len(its), warmup_iterations=len(its) - len(measured),
               measured_iterations=len(measured), first_loss=losses[0] if losses else None,
               last_loss=losses[-1] if losses else None,
               transformer_impl=parsed["arguments"].get("transformer_impl"), bf16=parsed["arguments"].get("bf16"))
    if measured and "optimizer" in measured[0]["timers"] and not problems:
        step = [r["ms"] for r in measured]
        opt = [r["timers"]["optimizer"] for r in measured]
        out.update(step_ms=statistics.median(step), optimizer_ms=statistics.median(opt),
                   optimizer_share=statistics.median(o / s for o, s in zip(opt, step)),
                   timers_ms={name: statistics.median(r["timers"].get(name, 0.0) for r in measured)
                              for name in measured[-1]["timers"]})
    out["status"] = "failed" if problems else "ok"
    if problems:
        out["error"] = "; ".join(problems)
    return out


def summarize_orthogonalize(path: pathlib.Path) -> dict:
    """orthogonalize.py's JSON as one piece: ok when every row of ours that was meant to run ran. A baseline that
    fails (torch.optim.Muon, emerging-optimizers) is reported but is not ours to accept."""
    data = json.loads(path.read_text())
    rows = data["rows"]
    failed = [r for r in rows if (r["note"] or "").startswith("failed")]
    ours_failed = [r for r in failed if r["method"] == "megatron_muon"]
    ran = [r for r in rows if r["ms"] is not None]
    keys = ("shape", "method", "ns_method", "resolved_method", "precision", "coefficients", "ms", "tflops",
            "polar_err", "rounding_dev", "note")
    piece = dict(status="ok" if ran and not ours_failed else "failed", json=str(path),
                 device=data["metadata"]["device"], rows_run=len(ran), rows_failed=len(failed),
                 rows_listed_not_run=len(rows) - len(ran) - len(failed), notes=data["metadata"]["notes"],
                 rows=[{k: r.get(k) for k in keys} for r in rows])
    if ours_failed:
        piece["error"] = "; ".join(f"{r['shape']} {r['ns_method']} {r['precision']} {r['coefficients']}: "
                                   f"{r['note']}" for r in ours_failed[:5])
    elif not ran:
        piece["error"] = "no row ran"
    return piece


# ---- running commands ------------------------------------------------------------------------------------------
class Log:
    """The log file beside the JSON: every command, its exit status, its time and its whole output."""

    def __init__(self, path: pathlib.Path):
        self.file = path.open("w")

    def write(self, text: str) -> None:
        self.file.write(text if text.endswith("\n") else text + "\n")
        self.file.flush()

    def run(self, label: str, cmd: list[str], timeout_s: float, env: dict | None = None) -> dict:
        """Run `cmd` in the repository root, killed with its whole process group after `timeout_s`."""
        if timeout_s <= 1:
            self.write(f"\n===== [{label}] not started: no time left in the part's budget")
            return dict(returncode=None, seconds=0.0, output="",
                        error=f"not started: no time left in the part's budget for {label}")
        self.write(f"\n===== [{label}] $ {subprocess.list2cmdline(cmd)}  (timeout {timeout_s:.0f} s)")
        start = time.monotonic()
        # A session of its own so that a timeout also ends what the command started (data-loader workers, ranks).
        proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            timed_out = True
        seconds = time.monotonic() - start
        self.write(output or "")
        self.write(f"===== [{label}] exit {proc.returncode}{' (timed out)' if timed_out else ''} after {seconds:.1f} s")
        result = dict(returncode=proc.returncode, seconds=round(seconds, 1), output=output or "")
        if timed_out:
            result["error"] = f"timed out after {timeout_s:.0f} s (killed)"
        elif proc.returncode != 0:
            result["error"] = f"exit status {proc.returncode}: {_tail(output)}"
        return result


def _tail(output: str, lines: int = 6) -> str:
    """The last lines that say something: where a failed command's reason usually is."""
    kept = [line for line in (output or "").splitlines() if line.strip() and "Warning" not in line]
    return " | ".join(kept[-lines:])[-1500:]


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_worker(log: Log, label: str, worker: str, cuda: bool, timeout_s: float, **options) -> dict:
    """This script in worker mode in a fresh process; its JSON result, or why there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "result.json"
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker", worker, "--worker-out", str(out),
               "--device", "cuda" if cuda else "cpu", "--worker-options", json.dumps(options)]
        run = log.run(label, cmd, timeout_s)
        if out.exists():
            result = json.loads(out.read_text())
            result["seconds"] = run["seconds"]
            return result
    return dict(status="failed", error=run.get("error") or f"the worker wrote no result: {_tail(run['output'])}")


# ---- part (a): Newton-Schulz ----------------------------------------------------------------------------------
def part_newton_schulz(ctx: argparse.Namespace, log: Log, budget: Budget) -> dict:
    pieces = {"fp8_gemm_vs_fp64": run_worker(log, "newton_schulz/fp8_gemm_vs_fp64", "fp8-gemm", ctx.cuda,
                                             min(budget.left(), 40))}
    methods = ["--methods", *METHODS]  # precisions and coefficient sets: orthogonalize.py's default is all of them
    if ctx.cuda:
        # The error columns cost one float64 SVD per row; on the paper shapes (300 rows) that alone would take
        # minutes, so the paper shapes are timed without them and the small shapes carry them.
        runs = {"paper_timings": (["--shapes", "paper", "--repeats", str(ctx.ns_repeats), "--no-error"], 0.7),
                "small_errors": (["--shapes", "small", "--repeats", "3"], 1.0)}
    else:
        runs = {"tiny_cpu": (["--shapes", "small", "--repeats", str(ctx.ns_repeats)], 1.0)}
    for name, (flags, share) in runs.items():
        path = ctx.json.with_name(f"{ctx.json.stem}-orthogonalize-{name.replace('_', '-')}.json")
        argv = ["--device", ctx.device, *methods, *flags, "--json", str(path)]
        if ctx.cuda:
            cmd = [sys.executable, str(BENCHMARKS / "orthogonalize.py"), *argv]
        else:
            # orthogonalize.py has no shape set small enough for a CPU smoke run: the tiny set replaces its `small`
            # set in place, so the script's own main (configs, skip rules, timing, errors, JSON) runs unchanged.
            code = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); import orthogonalize as o; "
                    f"o.SMALL_SHAPES.clear(); o.SMALL_SHAPES.update({TINY_NS_SHAPES!r}); "
                    f"sys.argv = ['orthogonalize.py', *{argv!r}]; o.main()")
            cmd = [sys.executable, "-c", code]
        run = log.run(f"newton_schulz/{name}", cmd, budget.left() * share)
        if "error" in run:
            pieces[name] = dict(status="failed", error=run["error"])
        else:
            pieces[name] = summarize_orthogonalize(path) | dict(seconds=run["seconds"])
            if not ctx.cuda:
                pieces[name]["shapes"] = {k: list(v) for k, v in TINY_NS_SHAPES.items()}
    return pieces


def worker_fp8_gemm(cuda: bool, options: dict) -> dict:
    """FP8 products of each backend against fp64, and one fp8 Newton-Schulz against the float64 SVD reference.

    The first Transformer Engine product on a device also runs the library's own first-use check
    (precision._check_te_once), which raises on a result too far from fp64: that error is recorded here.
    """
    from megatron_muon.newton_schulz import check_precision, orthogonalize, rounding_error, spectral_matrix
    from megatron_muon.newton_schulz.precision import _TE_CHECK_TOLERANCE, fp8_gemm_backend, gemms_for

    device = torch.device("cuda" if cuda else "cpu")
    try:
        check_precision("fp8", device)
    except RuntimeError as e:  # FP8 is expected on the GPU machine (H100/H200), optional elsewhere
        return dict(status="failed", error=str(e)) if cuda else dict(status="skipped", reason=str(e))
    gen = torch.Generator(device=device).manual_seed(0)
    if cuda:  # the paper's 3.67B shapes: K @ Q-sized, and the Gram matrix of `down`
        a_shape, b_shape, gram_shape, ns_shape = (1, 1280, 2560), (1, 2560, 2560), (1, 2560, 10240), (1280, 2560)
    else:
        a_shape, b_shape, gram_shape, ns_shape = (1, 128, 256), (1, 256, 128), (1, 128, 512), (64, 256)
    a, b, x = (torch.randn(s, generator=gen, device=device) for s in (a_shape, b_shape, gram_shape))
    exact = {"matmul": a.double() @ b.double(), "gram": x.double() @ x.double().mT}
    ns_input = spectral_matrix(*ns_shape, seed=0).to(device)
    result = dict(tolerance=_TE_CHECK_TOLERANCE, shapes=dict(matmul=[a_shape, b_shape], gram=gram_shape,
                                                             newton_schulz=ns_shape), backends={})
    statuses = []
    for requested in ("torch", "transformer_engine"):
        try:
            backend = fp8_gemm_backend(device, requested)
        except RuntimeError as e:
            # Transformer Engine needs CUDA: not expected on CPU, but expected on the GPU machine.
            result["backends"][requested] = (dict(status="failed", error=str(e)) if cuda
                                             else dict(status="skipped", reason=str(e)))
            statuses.append(result["backends"][requested]["status"])
            continue
        gemms = gemms_for("fp8", backend)
        entry: dict = dict(backend=backend)
        try:
            products = {"matmul": gemms.matmul(a, b), "gram": gemms.gram(x)}
            entry["relative_error_vs_fp64"] = {
                k: float((v.double() - exact[k]).norm() / exact[k].norm()) for k, v in products.items()}
            out = orthogonalize(ns_input, 5, "jordan", "fp8", fp8_backend=requested)
            entry["newton_schulz_fp8_rounding_vs_fp64_svd"] = rounding_error(ns_input, out, 5, "jordan")
        except Exception as e:  # TE's API moves between releases; its failure is a finding, not a crash
            entry.update(status="failed", error=_error(e))
        else:
            # The library's bound for TE's first product holds for either backend: e4m3 operands give ~3%.
            worst = max(entry["relative_error_vs_fp64"].values())
            entry["status"] = "ok" if worst <= _TE_CHECK_TOLERANCE else "failed"
            if entry["status"] == "failed":
                entry["error"] = f"product {worst:.3g} away from fp64, above {_TE_CHECK_TOLERANCE}"
        result["backends"][requested] = entry
        statuses.append(entry["status"])
    result["status"] = combine({str(i): dict(status=s) for i, s in enumerate(statuses)})
    return result


# ---- part (b): training through megatron.training ---------------------------------------------------------------
def training_command(ctx: argparse.Namespace, optimizer: str) -> list[str]:
    config = get_model_config(ctx.model_config)
    flags = ["--model-config", ctx.model_config, "--optimizer", optimizer, "--use-distributed-optimizer",
             # Mock data: no tokenizer training or corpus build inside the budget; the paper's vocabulary size.
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(config.shape.vocab_size),
             "--seq-length", str(ctx.seq_length), "--max-position-embeddings", str(ctx.seq_length),
             "--micro-batch-size", str(ctx.micro_batch), "--global-batch-size", str(ctx.global_batch),
             "--lr", "3e-3", "--train-iters", str(ctx.train_iters), "--eval-iters", "0",
             "--log-interval", "1", "--timing-log-level", "1", "--logging-level", "20",
             # bf16 on CPU too: NVIDIA's layer-wise optimizer does not build in fp32 (ChainedOptimizer asserts).
             "--bf16"]
    if ctx.cuda:
        flags += ["--transformer-impl", "transformer_engine"]
    return [sys.executable, "-m", "megatron_muon.train", *flags]


def part_training(ctx: argparse.Namespace, log: Log, budget: Budget) -> dict:
    pieces = {}
    for i, optimizer in enumerate(ctx.optimizers):
        cmd = training_command(ctx, optimizer)
        # An even share of what is left, so one slow optimizer cannot take the others' time.
        run = log.run(f"training/{optimizer}", cmd, budget.left() / (len(ctx.optimizers) - i))
        piece = summarize_training(parse_training_log(run["output"]), ctx.train_iters)
        if "error" in run:  # the process failing outranks what its log says
            piece.update(status="failed", error=run["error"])
        piece.update(command=subprocess.list2cmdline(cmd[1:]), seconds=run["seconds"])
        pieces[optimizer] = piece
    return pieces


# ---- parts (c) and (d): one optimizer step on one rank, in a worker -------------------------------------------
@contextlib.contextmanager
def one_rank(cuda: bool):
    """A one-rank process group (NCCL on a GPU, gloo on CPU) with Megatron's parallel state on it."""
    import torch.distributed as dist

    from megatron_muon.integration.parallel_state import model_parallel

    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with model_parallel(seed=1234):
            yield
    finally:
        dist.destroy_process_group()


def optimizer_config(name: str):
    """Configured like part (b)'s `--optimizer NAME --use-distributed-optimizer --bf16 --lr 3e-3` (other
    hyperparameters at their defaults; they change values, not which kernels a step launches)."""
    from megatron_muon.integration.flags import MuonOptimizerConfig

    common = dict(lr=3e-3, bf16=True, clip_grad=1.0, use_distributed_optimizer=True)
    if name == "nvidia_muon":
        # megatron.training turns --use-distributed-optimizer into the layer-wise optimizer for NVIDIA's Muon.
        return MuonOptimizerConfig(optimizer=name, use_layer_wise_distributed_optimizer=True,
                                   **{**common, "use_distributed_optimizer": False})
    return MuonOptimizerConfig(optimizer=name, **common)


class StepRig:
    """A Trainer on one rank for optimizer `name`, and fresh gradients on demand."""

    def __init__(self, name: str, cuda: bool):
        import dataclasses

        from megatron_muon.integration.training import Trainer, TrainingSetup

        model, seq = STEP_MODEL["cuda" if cuda else "cpu"]
        self.cuda = cuda
        self.shape = dataclasses.replace(get_model_config(model).shape, seq_length=seq)
        # The Trainer builds weights on CPU from the seed (use_cpu_initialization); moving the modules in place
        # before DDP and the optimizer take their references puts every parameter and buffer on the GPU.
        move = (lambda models: [m.cuda() for m in models]) if cuda else None
        self.trainer = Trainer(TrainingSetup(self.shape, optimizer_config(name), torch.bfloat16, seed=1234),
                               init_weights=move)
        self.seed = 0

    def gradients(self) -> None:
        from megatron_muon.integration.training import Batch, synthetic_batches

        batches = synthetic_batches(self.shape, 1, 1, seed=self.seed)
        self.seed += 1
        if self.cuda:
            batches = [Batch(b.tokens.cuda(), b.labels.cuda()) for b in batches]
        # The Trainer's forward step builds position ids and the causal mask with bare factory calls: the default
        # device puts them beside the model.
        with torch.device("cuda") if self.cuda else contextlib.nullcontext():
            self.trainer.forward_backward(batches)
        self.trainer.finalize_grads()

    def step(self) -> None:
        if not self.trainer.optimizer_step():
            raise FloatingPointError("Megatron skipped the step (non-finite gradients)")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed_step_ms(self, repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            self.gradients()
            self.sync()
            start = time.perf_counter()
            self.step()
            self.sync()
            times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)


def _error(e: BaseException) -> str:
    """The exception and what it interrupted: a failed CUDA graph capture raises again when the capture ends, and
    the first error (the operation capture refused) is the informative one."""
    chain = []
    while e is not None and len(chain) < 3:
        chain.append(f"{type(e).__name__}: {e}".strip())
        e = e.__cause__ or e.__context__
    return " <- during: ".join(chain)[:2000]


GRAPH_ATTEMPTS = ("megatron_optimizer_step", "inner_optimizer_step")


def worker_graph(cuda: bool, options: dict) -> dict:
    """Capture the plugin's step in a CUDA graph: Megatron's optimizer.step() around it, then the inner optimizer
    (ShardedMuonAdamW) alone, which leaves out the wrapper's grad-norm and found-inf reads."""
    model, seq = STEP_MODEL["cuda"]
    result = dict(model=model, seq_length=seq, optimizer="muon", attempts={})
    try:
        with one_rank(cuda):
            _capture_attempts(StepRig("muon", cuda), result["attempts"])
    except Exception as e:
        # Before both attempts the part failed; after them it is tearing down a device a failed capture broke.
        result["error" if len(result["attempts"]) < len(GRAPH_ATTEMPTS) else "teardown_error"] = _error(e)
    # Attempted and reported is what this part checks; whether capture works is its finding.
    result["status"] = "ok" if len(result["attempts"]) == len(GRAPH_ATTEMPTS) else "failed"
    return result


def _capture_attempts(rig: StepRig, attempts: dict) -> None:
    # Warm-up on a side stream, as torch.cuda.graph requires: lazily created state (momentum, workspaces) must
    # exist before capture, and the capture stream must not carry earlier work.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(STEP_WARMUP):
            rig.gradients()
            rig.step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer = rig.trainer.optimizer
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    steps = dict(zip(GRAPH_ATTEMPTS, (optimizer.step, lambda: [o.step() for o in inner])))
    for label, fn in steps.items():
        try:
            # Inside the try: a failed capture can leave the device unusable, and that is this attempt's result.
            rig.gradients()
            rig.sync()
        except Exception as e:
            attempts[label] = dict(captured=False, error=f"before capture: {_error(e)}")
            continue
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                fn()
        except Exception as e:
            attempts[label] = dict(captured=False, error=_error(e))
            continue
        entry = dict(captured=True)
        try:  # a graph that captured can still fail on replay
            rig.sync()
            start = time.perf_counter()
            for _ in range(5):
                graph.replay()
            rig.sync()
            entry["replay_ms"] = 1e3 * (time.perf_counter() - start) / 5
            start = time.perf_counter()
            fn()
            rig.sync()
            entry["eager_ms"] = 1e3 * (time.perf_counter() - start)
        except Exception as e:
            entry["replay_error"] = _error(e)
        attempts[label] = entry


def worker_profile(cuda: bool, options: dict) -> dict:
    """torch.profiler around one optimizer.step() per optimizer: CUDA kernels, memcpy / memset, runtime calls and
    host-side aten events; on CPU the host side only."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    model, seq = STEP_MODEL["cuda" if cuda else "cpu"]
    result = dict(model=model, seq_length=seq, dtype="bf16", optimizers={})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for name in options["optimizers"]:
        try:
            with one_rank(cuda):
                rig = StepRig(name, cuda)
                for _ in range(STEP_WARMUP):
                    rig.gradients()
                    rig.step()
                rig.gradients()
                rig.sync()
                with profile(activities=activities) as prof:
                    rig.step()
                    rig.sync()
                events = prof.events()
                host = [e for e in events if e.device_type == DeviceType.CPU]
                aten = [e for e in host if e.name.startswith("aten::")]
                entry = dict(
                    status="ok",
                    aten_events=len(aten),
                    # Those not inside another aten op: what the step itself calls.
                    aten_ops_outermost=sum(1 for e in aten if not _inside_aten(e)),
                    step_ms_eager=rig.timed_step_ms(),
                )
                if cuda:
                    device = [e for e in events if e.device_type == DeviceType.CUDA]
                    kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset"))]
                    entry.update(
                        cuda_kernels=len(kernels),
                        memcpy=sum(1 for e in device if e.name.startswith("Memcpy")),
                        memset=sum(1 for e in device if e.name.startswith("Memset")),
                        kernel_time_ms=sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
                        # CUDA runtime calls: launches and host syncs (one cudaDeviceSynchronize is our own).
                        runtime_calls=dict(collections.Counter(
                            e.name for e in host if e.name.startswith("cu")).most_common()),
                        top_kernels=dict(collections.Counter(
                            e.name[:120] for e in kernels).most_common(PROFILE_TOP_KERNELS)),
                    )
                    if not kernels:
                        entry.update(status="failed", error="the profiler saw no CUDA kernel inside the step")
                else:
                    entry["cuda_kernels"] = None
                    entry["cuda_kernels_reason"] = "no CUDA device: the profiler has no device activity to record"
        except Exception as e:
            entry = dict(status="failed", error=_error(e), traceback=traceback.format_exc()[-3000:])
        result["optimizers"][name] = entry
    result["status"] = combine(result["optimizers"])
    return result


def _inside_aten(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def part_cuda_graph(ctx: argparse.Namespace, log: Log, budget: Budget) -> dict:
    return {"capture": run_worker(log, "cuda_graph/capture", "graph", ctx.cuda, budget.left())}


def part_op_counts(ctx: argparse.Namespace, log: Log, budget: Budget) -> dict:
    pieces = {"profiler": run_worker(log, "op_counts/profiler", "profile", ctx.cuda, budget.left() * 0.65,
                                     optimizers=list(ctx.optimizers))}
    script = BENCHMARKS / "step_ops.py"
    if not script.exists():
        pieces["step_ops"] = dict(status="unavailable", reason=f"{script.relative_to(REPO)} not found")
        return pieces
    path = ctx.json.with_name(f"{ctx.json.stem}-step-ops.json")
    # step_ops.py counts what the dispatcher sees on CPU (its design); on the GPU machine the GPU is hidden from
    # it so that it runs that same CPU path, and its counts sit beside the profiler's kernel counts.
    cmd = [sys.executable, str(script), "--rows", *ctx.optimizers, "--layers", *map(str, ctx.step_ops_layers),
           "--out", str(path)]
    run = log.run("op_counts/step_ops", cmd, budget.left(), env={"CUDA_VISIBLE_DEVICES": ""})
    if "error" in run:
        pieces["step_ops"] = dict(status="failed", error=run["error"])
    else:
        data = json.loads(path.read_text())
        pieces["step_ops"] = dict(
            status="ok", json=str(path), layers=data["layers"], seconds=run["seconds"],
            rows={row: dict(aten_ops_per_layer=r["aten_ops_per_layer"],
                            by_layers={n: {k: c[k] for k in ("aten_ops", "view_ops", "collectives", "host_syncs")}
                                       for n, c in r["by_layers"].items()})
                  for row, r in data["rows"].items()})
    return pieces


PART_FUNCTIONS = {"newton_schulz": part_newton_schulz, "training": part_training, "cuda_graph": part_cuda_graph,
                  "op_counts": part_op_counts}
WORKERS = {"fp8-gemm": worker_fp8_gemm, "graph": worker_graph, "profile": worker_profile}


def run_part(name: str, ctx: argparse.Namespace, log: Log) -> dict:
    budget_s = ctx.budgets[name]
    if name == "cuda_graph" and not ctx.cuda:
        return dict(expected=False, status="skipped", reason="skipped: needs CUDA", budget_s=0, seconds=0.0)
    start = time.monotonic()
    try:
        pieces = PART_FUNCTIONS[name](ctx, log, Budget(budget_s))
        status, error = combine(pieces), None
    except Exception as e:  # a part that breaks must not stop the others
        log.write(traceback.format_exc())
        pieces, status, error = {}, "failed", _error(e)
    part = dict(expected=True, status=status, budget_s=budget_s, seconds=round(time.monotonic() - start, 1),
                pieces=pieces)
    if error:
        part["error"] = error
    return part


# ---- main -----------------------------------------------------------------------------------------------------
def _version(*distributions: str) -> str | None:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def environment() -> dict:
    return dict(
        python=platform.python_version(), torch=torch.__version__, cuda_runtime=torch.version.cuda,
        megatron_core=_version("megatron-core"), emerging_optimizers=_version("emerging-optimizers"),
        transformer_engine=_version("transformer-engine", "transformer_engine", "transformer-engine-cu12",
                                    "transformer-engine-torch")
        or ("installed (version unknown)" if importlib.util.find_spec("transformer_engine") else None),
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: the full run where CUDA is available, the CPU subset elsewhere")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    p.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("results"))
    p.add_argument("--json", type=pathlib.Path, help="default: <out-dir>/gpu-check-<device>.json (log beside it)")
    p.add_argument("--model-config", help="training part's model (default: 0.20b on GPU, cpu-tiny on CPU)")
    p.add_argument("--train-iters", type=int, help="default: 30 on GPU, 6 on CPU")
    p.add_argument("--seq-length", type=int, help=f"default: the paper's {PAPER_SEQ_LENGTH} on GPU, 32 on CPU")
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--global-batch", type=int, help="sequences per step (default: 4 on GPU, 2 on CPU)")
    p.add_argument("--ns-repeats", type=int, help="timed calls per Newton-Schulz row (default: 5 on GPU, 2 on CPU)")
    # Its counts are exact integers, so the two smallest depths give the same growth per layer as deeper ones.
    p.add_argument("--step-ops-layers", nargs="+", type=int, default=[1, 2], help="depths for step_ops.py")
    p.add_argument("--budget", nargs="+", default=[], metavar="PART=SECONDS", help="override a part's time budget")
    # Worker mode: one piece in a fresh process (internal; the parent passes these).
    p.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=pathlib.Path, help=argparse.SUPPRESS)
    p.add_argument("--worker-options", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    args.cuda = args.device == "cuda"
    gpu = args.cuda
    args.model_config = args.model_config or ("0.20b" if gpu else "cpu-tiny")
    args.train_iters = args.train_iters or (30 if gpu else 6)
    args.seq_length = args.seq_length or (PAPER_SEQ_LENGTH if gpu else 32)
    args.global_batch = args.global_batch or (4 if gpu else 2)
    args.ns_repeats = args.ns_repeats or (5 if gpu else 2)
    args.budgets = dict(GPU_BUDGETS if gpu else CPU_BUDGETS)
    for item in args.budget:
        part, _, seconds = item.partition("=")
        if part not in PARTS or not seconds.replace(".", "", 1).isdigit():
            p.error(f"--budget {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        args.budgets[part] = float(seconds)
    return args


def device_name(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name(0)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _piece_detail(piece: dict) -> str:
    """One line per piece for the terminal; the JSON has everything."""
    if piece.get("error") or piece.get("reason"):
        return piece.get("error") or piece["reason"]
    if "step_ms" in piece:  # a training run
        return (f"iteration {piece['step_ms']:.1f} ms, optimizer {piece['optimizer_ms']:.1f} ms "
                f"({100 * piece['optimizer_share']:.1f}%), {piece['transformer_impl']}")
    if "rows_run" in piece:  # an orthogonalize.py run
        return (f"{piece['rows_run']} rows run, {piece['rows_failed']} failed, "
                f"{piece['rows_listed_not_run']} listed, not run")
    if "backends" in piece:  # FP8 GEMMs against fp64
        return "; ".join(f"{name}: " + (", ".join(f"{k} {v:.2g}" for k, v in b["relative_error_vs_fp64"].items())
                                        if "relative_error_vs_fp64" in b else b["status"])
                         for name, b in piece["backends"].items())
    if "attempts" in piece:  # CUDA graph capture
        return "; ".join(f"{k}: {'captured' if a['captured'] else 'not captured'}"
                         for k, a in piece["attempts"].items())
    if "optimizers" in piece:  # the profiler
        return "; ".join(f"{k}: {o.get('aten_ops_outermost')} aten ops"
                         + ("" if o.get("cuda_kernels") is None else f", {o['cuda_kernels']} kernels")
                         for k, o in piece["optimizers"].items())
    if "rows" in piece:  # step_ops.py
        return "; ".join(f"{k}: {r['aten_ops_per_layer']:.0f} ops/layer" for k, r in piece["rows"].items())
    return ""


def _print_summary(report: dict) -> None:
    print(f"gpu-check on {report['device']['name']}: exit {report['exit_code']}")
    for name, part in report["parts"].items():
        reason = part.get("error") or part.get("reason") or ""
        print(f"  {name:<14} {part['status']:<8} {part['seconds']:>6.1f} s  {reason}".rstrip())
        for piece_name, piece in part.get("pieces", {}).items():
            print(f"      {piece_name:<18} {piece['status']:<11} {_piece_detail(piece)[:160]}".rstrip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        try:
            result = WORKERS[args.worker](args.cuda, json.loads(args.worker_options))
        except Exception as e:  # the parent records the reason instead of a bare exit status
            result = dict(status="failed", error=_error(e), traceback=traceback.format_exc()[-3000:])
        args.worker_out.write_text(json.dumps(result, indent=2) + "\n")
        return 0

    name = device_name(args.cuda)
    slug = device_slug(torch.cuda.get_device_name(0)) if args.cuda else "cpu"
    args.json = (args.json or args.out_dir / f"gpu-check-{slug}.json").resolve()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.json.with_suffix(".log")
    log = Log(log_path)
    started = time.monotonic()
    report = dict(
        device=dict(type=args.device, name=name, slug=slug,
                    capability=list(torch.cuda.get_device_capability(0)) if args.cuda else None),
        ran_on_gpu=args.cuda,
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        environment=environment(),
        settings=dict(parts=args.parts, optimizers=args.optimizers, model_config=args.model_config,
                      train_iters=args.train_iters, warmup_iterations=WARMUP_ITERATIONS,
                      seq_length=args.seq_length,
                      seq_length_note=("the paper's" if args.seq_length == PAPER_SEQ_LENGTH
                                       else f"reduced from the paper's {PAPER_SEQ_LENGTH}"),
                      micro_batch=args.micro_batch, global_batch=args.global_batch,
                      tokens_per_step=args.seq_length * args.global_batch, ns_repeats=args.ns_repeats,
                      step_model=dict(zip(("model", "seq_length"), STEP_MODEL[args.device])),
                      step_ops_layers=args.step_ops_layers, budgets_s=args.budgets),
        log=str(log_path),
        parts={},
    )
    log.write(f"gpu-check {report['started']} on {name}; settings {json.dumps(report['settings'])}")
    for part in args.parts:
        print(f"[gpu-check] {part} ...", file=sys.stderr, flush=True)
        report["parts"][part] = run_part(part, args, log)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["exit_code"] = exit_code(report["parts"])
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    _print_summary(report)
    print(f"wrote {args.json} and {log_path}")
    return report["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
