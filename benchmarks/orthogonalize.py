"""Speed and accuracy of our Newton-Schulz engine next to torch.optim.Muon's and NVIDIA emerging-optimizers'.

Every method sees the same seeded input per shape, and the methods of a shape are timed in interleaved rounds (one
call of each per round), so a change in machine load lands on all of them alike. Accuracy is measured two ways:
against the exact polar factor U V^T (how far 5 steps of a schedule get), and against the exact-arithmetic
polynomial of the same schedule (what is left is rounding error alone, the price of bf16 / fp8 GEMMs). See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

# The script must run from a bare checkout (no install, no megatron-core): the engine is pure torch.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from megatron_muon.newton_schulz import (  # noqa: E402
    COEFFICIENT_SETS, FP8_QUANTIZATIONS, FP8_UNSTABLE_COEFFICIENTS, NORM_EPS, PRECISIONS,
    check_precision, composed_polynomial, orthogonalization_flops, orthogonalize, precision_schedule, resolve_method,
    restart_points,
)

STEPS = 5  # the step count Muon uses in the paper and in both baselines' defaults
WARMUP = 2  # the first GPU calls pay for cuBLAS handle creation and heuristics, fp8's first for torch.compile
# Torch weights are [out, in]. One layer of the paper's 3.67B model: same-shape matrices share a row (their cost is
# identical), and K/V, gate/up are also timed as a stack of 2, since batching same-shape matrices is what the engine
# offers them (torch.optim.Muon loops over such a stack, as it does over parameters).
PAPER_SHAPES = {
    "Q, O 2560x2560": (1, 2560, 2560),
    "K, V 1280x2560": (1, 1280, 2560),
    "gate, up 10240x2560": (1, 10240, 2560),
    "down 2560x10240": (1, 2560, 10240),
    "K+V stack [2,1280,2560]": (2, 1280, 2560),
    "gate+up stack [2,10240,2560]": (2, 10240, 2560),
}
SMALL_SHAPES = {"256x256": (1, 256, 256), "512x2048": (1, 512, 2048), "1024x4096": (1, 1024, 4096)}
EMERGING_NAMES = {"jordan": "simple", "quintic": "quintic", "polar_express": "polar_express"}
# Our precisions plus the measured fp8>bf16 schedule (fp8 for the first iterations, newton_schulz.LOW_PRECISION_STEPS).
OUR_PRECISIONS = PRECISIONS + ("fp8>bf16",)
NS_METHODS = ("standard", "gram", "auto")


@dataclass
class Config:
    method: str
    precision: str
    coefficients: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    ns_method: str = "standard"  # ours: standard / gram / auto; baselines run standard Newton-Schulz
    fp8_quantization: str | None = None  # ours, where an iteration runs fp8: orthogonalize's `fp8_quantization`
    # Applied around every call so that "fp32" means fp32 even if the caller's process enabled TF32.
    matmul_precision: str = "highest"
    skip: str | None = None


def torch_muon() -> tuple[Callable | None, str | None]:
    """torch.optim.Muon's orthogonalization (a private function, so its signature is checked, not trusted)."""
    try:
        from torch.optim import _muon
        fn = _muon._zeropower_via_newtonschulz
    except (ImportError, AttributeError) as e:
        return None, f"torch.optim.Muon: not available in torch {torch.__version__} ({e})"
    expected = ["grad", "ns_coefficients", "ns_steps", "eps"]
    if list(inspect.signature(fn).parameters) != expected:
        return None, f"torch.optim.Muon: API mismatch, expected {expected}, found {inspect.signature(fn)}"
    jordan = COEFFICIENT_SETS["jordan"].polynomials[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        # It takes one 2-D matrix and returns bf16; the optimizer loops over parameters, so do we.
        outs = [fn(xi, jordan, STEPS, NORM_EPS).float() for xi in x.reshape(-1, *x.shape[-2:])]
        return torch.stack(outs).reshape(x.shape)

    return run, None


def emerging_newton_schulz() -> tuple[Callable | None, str | None]:
    try:
        from emerging_optimizers.orthogonalized_optimizers.muon_utils import newton_schulz
    except ModuleNotFoundError as e:
        return None, f"emerging_optimizers: not installed ({e})"
    except Exception as e:  # its import pulls in absl and triton kernels, any of which can break
        return None, f"emerging_optimizers: import failed ({type(e).__name__}: {e})"
    params = inspect.signature(newton_schulz).parameters
    if not {"x", "steps", "coefficient_type"} <= set(params):
        return None, f"emerging_optimizers: API mismatch, newton_schulz{inspect.signature(newton_schulz)}"
    return newton_schulz, None


def build_configs(args: argparse.Namespace, device: torch.device, notes: list[str]) -> list[Config]:
    configs = []
    precisions = list(args.precisions)
    if any("fp8" in p for p in precisions):
        try:
            check_precision("fp8", device)
        except RuntimeError as e:
            notes.append(f"fp8 skipped: {e}")
            precisions = [p for p in precisions if "fp8" not in p]
    for ns_method in args.methods:
        for precision in precisions:
            for coeffs in args.coefficients:
                skip = "unstable in fp8" if "fp8" in precision and coeffs in FP8_UNSTABLE_COEFFICIENTS else None
                for quantization in args.fp8_quantization if "fp8" in precision else [None]:
                    fn = functools.partial(orthogonalize, steps=STEPS, coefficients=coeffs, precision=precision,
                                           method=ns_method, fp8_quantization=quantization or "auto")
                    configs.append(Config("megatron_muon", precision, coeffs, fn, ns_method=ns_method, skip=skip,
                                          fp8_quantization=quantization))
    muon, why = torch_muon()
    if muon is None:
        notes.append(why)
    else:
        configs.append(Config("torch.optim.Muon", "bf16", "jordan", muon))
    ns, why = emerging_newton_schulz()
    if ns is None:
        notes.append(why)
    else:
        # It reads the global matmul precision: "medium" switches its iteration to bf16.
        for coeffs in args.coefficients:
            for precision, setting in (("fp32", "highest"), ("bf16", "medium")):
                fn = functools.partial(ns, steps=STEPS, coefficient_type=EMERGING_NAMES[coeffs])
                configs.append(Config("emerging_optimizers", precision, coeffs, fn, matmul_precision=setting))
    return [c for c in configs if c.precision in args.precisions and c.coefficients in args.coefficients]


def make_input(batch: int, rows: int, cols: int, seed: int, device: torch.device) -> torch.Tensor:
    """Gradient-like: singular values log-spaced over 3 decades, random singular vectors."""
    gen = torch.Generator(device=device).manual_seed(seed)
    r = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(batch, rows, r, generator=gen, device=device, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(batch, cols, r, generator=gen, device=device, dtype=torch.float64))
    s = torch.logspace(0, -3, r, device=device, dtype=torch.float64)
    x = ((U * s) @ V.mT).float()
    return x if batch > 1 else x[0]


class Reference:
    """Float64 SVDs of one input, computed once and shared by every method and config of its shape."""

    def __init__(self, x: torch.Tensor):
        self.svds = [torch.linalg.svd(xi, full_matrices=False) for xi in x.double().reshape(-1, *x.shape[-2:])]
        # polar_error's default rank_rtol: on the numerical null space the exact polar factor is 0.
        self.ranks = [int((S > S[0] * 1e-6).sum()) for _, S, _ in self.svds]
        self.polars = [U[:, :r] @ Vh[:r] for (U, _, Vh), r in zip(self.svds, self.ranks)]
        self._exact: dict[str, list[torch.Tensor]] = {}

    def exact(self, coefficients: str) -> list[torch.Tensor]:
        """orthogonalize_via_svd's output, without paying for its SVD again."""
        if coefficients not in self._exact:
            self._exact[coefficients] = [
                (U * composed_polynomial(S / (S.norm() + NORM_EPS), STEPS, coefficients)) @ Vh
                for U, S, Vh in self.svds
            ]
        return self._exact[coefficients]

    def errors(self, out: torch.Tensor, coefficients: str) -> dict[str, float]:
        """polar_error's fields (worst matrix of a stack), and the rounding deviation over the whole stack."""
        o64 = out.double().reshape(-1, *out.shape[-2:])
        if not torch.isfinite(o64).all():
            return dict(polar_err=math.nan, sigma_min=math.nan, sigma_max=math.nan, rounding_dev=math.nan)
        err, lo, hi, dev2, ref2 = 0.0, math.inf, 0.0, 0.0, 0.0
        for (U, _, Vh), r, polar, exact, oi in zip(self.svds, self.ranks, self.polars, self.exact(coefficients), o64):
            err = max(err, float(torch.linalg.matrix_norm(oi - polar)) / math.sqrt(r))
            band = torch.linalg.svdvals(U[:, :r].mT @ oi @ Vh[:r].mT)
            lo, hi = min(lo, float(band.min())), max(hi, float(band.max()))
            dev2 += float(torch.linalg.matrix_norm(oi - exact)) ** 2
            ref2 += float(torch.linalg.matrix_norm(exact)) ** 2
        return dict(polar_err=err, sigma_min=lo, sigma_max=hi, rounding_dev=math.sqrt(dev2 / ref2))


def call(cfg: Config, x: torch.Tensor, clock: Callable[[], float] = time.perf_counter) -> tuple[torch.Tensor, float]:
    """One synchronized call under the config's matmul precision: its output and its time in seconds on `clock`."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    try:
        sync()
        start = clock()
        out = cfg.fn(x)
        sync()
        return out, clock() - start
    finally:
        torch.set_float32_matmul_precision(previous)


def time_interleaved(configs: list[Config], x: torch.Tensor, repeats: int,
                     clock: Callable[[], float]) -> list[float | str]:
    """Median ms of each config over `repeats` rounds, each round one call of every config in turn; a config whose
    call raises leaves the later rounds and gets its error note instead."""
    times: list[list[float]] = [[] for _ in configs]
    failed: dict[int, str] = {}
    for _ in range(repeats):
        for i, cfg in enumerate(configs):
            if i in failed:
                continue
            try:
                times[i].append(call(cfg, x, clock)[1])
            except Exception as e:  # one broken baseline must not cost the rest of the run
                failed[i] = f"failed: {type(e).__name__}: {e}"
    return [failed.get(i) or 1e3 * statistics.median(t) for i, t in enumerate(times)]


def print_table(title: str, rows: list[dict]) -> None:
    def fmt(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    header = ["shape", "method", "precision", "coefficients", "GFLOP", "ms", "TFLOP/s", "speed vs Muon", "polar err",
              "sigma band", "rounding dev", "note"]
    cells = [[r["shape"], r["method"] + ("" if r["ns_method"] == "standard" else f" {r['ns_method']}")
              + (f" ({r['fp8_quantization']} quant.)" if r["fp8_quantization"] not in (None, "auto") else ""),
              r["precision"],
              r["coefficients"], fmt(r["gflop"], ".1f"), fmt(r["ms"], ".2f"),
              fmt(r["tflops"], ".3g"), fmt(r["speed_vs_torch_muon"], ".2f"), fmt(r["polar_err"], ".4f"),
              "-" if r["sigma_min"] is None else f"[{r['sigma_min']:.3f}, {r['sigma_max']:.3f}]",
              fmt(r["rounding_dev"], ".1e"), (r["note"] or "")[:60]] for r in rows]  # full note in the JSON
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(row[i]) for row in [header] + cells) for i in range(len(header))]
        print(title)
        for row in [header] + cells:
            line = (c.rjust(w) if 4 <= i <= 10 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
            print("  ".join(line).rstrip())
        return
    table = Table(title=title, title_justify="left")
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if 4 <= i <= 10 else "left")
    for row in cells:
        table.add_row(*row)
    Console(width=max(200, Console().width)).print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", choices=["paper", "small", "all"], help="default: all on cuda, small on cpu")
    p.add_argument("--repeats", type=int, help="timed calls per config after warmup (default: 10 cuda, 3 cpu)")
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's own choice)")
    p.add_argument("--clock", choices=["wall", "thread"], default="wall",
                   help="wall time, or (CPU with --threads 1) the CPU time of the one thread that runs every op, "
                        "which other processes on a shared machine do not inflate")
    p.add_argument("--precisions", nargs="+", choices=OUR_PRECISIONS, default=list(OUR_PRECISIONS))
    p.add_argument("--methods", nargs="+", choices=NS_METHODS, default=["standard", "gram"],
                   help="our Newton-Schulz methods (Gram rows where Gram refuses the precision are skipped)")
    p.add_argument("--coefficients", nargs="+", choices=list(COEFFICIENT_SETS), default=list(COEFFICIENT_SETS))
    p.add_argument("--fp8-quantization", nargs="+", choices=FP8_QUANTIZATIONS, default=["auto"],
                   help="how our fp8 rows quantize (orthogonalize's fp8_quantization), one row per value")
    p.add_argument("--json", type=pathlib.Path, help="default: results/orthogonalize-<device>.json")
    p.add_argument("--no-error", action="store_true", help="skip the float64 SVDs behind the error columns")
    args = p.parse_args()
    device = torch.device(args.device)
    shapes_choice = args.shapes or ("all" if device.type == "cuda" else "small")
    shapes = {"paper": PAPER_SHAPES, "small": SMALL_SHAPES, "all": {**PAPER_SHAPES, **SMALL_SHAPES}}[shapes_choice]
    repeats = args.repeats or (10 if device.type == "cuda" else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
        p.error("--clock thread needs --device cpu --threads 1: it counts the calling thread's CPU time only")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter

    notes: list[str] = []
    configs = build_configs(args, device, notes)
    device_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                   else f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)")
    timestamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    # Other processes on the machine slow every method of a round alike, but they make the medians noisier.
    load_before = os.getloadavg()
    title = (f"{device_name} | torch {torch.__version__} | {timestamp} | {STEPS} steps, median of {repeats} "
             f"interleaved rounds, {args.clock} clock | load average {load_before[0]:.2f} at start")

    rows = []
    for seed, (label, (batch, m, n)) in enumerate(shapes.items()):
        print(f"[{label}] {len(configs)} configs ...", file=sys.stderr, flush=True)
        x = make_input(batch, m, n, seed, device)
        ref = None if args.no_error else Reference(x)
        shape_rows, timed, timed_rows = [], [], []
        for cfg in configs:
            resolved = resolve_method(cfg.ns_method, m, n, STEPS, cfg.coefficients)
            skip, precisions = cfg.skip, [cfg.precision] * STEPS
            if cfg.method == "megatron_muon" and skip is None:
                precisions = list(precision_schedule(cfg.precision, STEPS, cfg.coefficients, resolved))
                restarts = restart_points(cfg.coefficients, STEPS)
                if resolved == "gram" and restarts and "fp8" in precisions[restarts[0]:]:
                    skip = "Gram refuses fp8 after its restart"
            # GFLOP are the FLOPs the row's method runs; `std_gflop` standard Newton-Schulz's for the same matrix.
            row = dict(shape=label, batch=batch, rows=m, cols=n, method=cfg.method, ns_method=cfg.ns_method,
                       resolved_method=resolved, precision=cfg.precision, precisions=precisions,
                       coefficients=cfg.coefficients, fp8_quantization=cfg.fp8_quantization,
                       gflop=batch * orthogonalization_flops(m, n, STEPS, cfg.coefficients, resolved) / 1e9,
                       std_gflop=batch * orthogonalization_flops(m, n, STEPS) / 1e9,
                       ms=None, tflops=None, speed_vs_torch_muon=None, polar_err=None, sigma_min=None,
                       sigma_max=None, rounding_dev=None, note=skip)
            if skip is None:
                # Warmup, and the output the error columns judge (every call computes the same thing).
                try:
                    for _ in range(WARMUP):
                        out = call(cfg, x)[0]
                except Exception as e:  # one broken baseline must not cost the rest of the run
                    row["note"] = f"failed: {type(e).__name__}: {e}"
                else:
                    if ref is not None:
                        row.update(ref.errors(out, cfg.coefficients))
                    timed.append(cfg)
                    timed_rows.append(row)
                    del out
            shape_rows.append(row)
        for row, result in zip(timed_rows, time_interleaved(timed, x, repeats, clock)):
            if isinstance(result, str):
                row["note"] = result
            else:
                row.update(ms=result, tflops=row["gflop"] / result)
        muon_ms = next((r["ms"] for r in timed_rows if r["method"] == "torch.optim.Muon"), None)
        for row in timed_rows:
            row["speed_vs_torch_muon"] = muon_ms / row["ms"] if muon_ms and row["ms"] else None
        rows.extend(shape_rows)
        del x, ref
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print_table(title, rows)
    for note in notes:
        print(f"note: {note}")
    path = args.json or pathlib.Path("results") / f"orthogonalize-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=device_name, device_type=device.type, torch=torch.__version__, timestamp=timestamp,
                repeats=repeats, warmup=WARMUP, steps=STEPS, shapes=shapes_choice, notes=notes,
                threads=torch.get_num_threads() if device.type == "cpu" else None, timing="interleaved rounds",
                clock=args.clock,
                load_average_start=load_before, load_average_end=os.getloadavg())
    path.write_text(json.dumps(dict(metadata=meta, rows=rows), indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
