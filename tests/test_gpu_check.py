"""benchmarks/gpu_check.py (`make gpu-check`): its CPU subset end to end, and the rules that decide its verdict."""

import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


@pytest.mark.parametrize("name, slug", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ("NVIDIA H200", "nvidia-h200"),
    ("  NVIDIA H100 PCIe (MIG 3g.40gb) ", "nvidia-h100-pcie-mig-3g-40gb"),
])
def test_device_slug(name, slug):
    assert gpu_check.device_slug(name) == slug


def test_device_slug_refuses_a_name_without_letters_or_digits():
    with pytest.raises(ValueError, match="no letters or digits"):
        gpu_check.device_slug(" /() ")


def _part(status, expected=True):
    return dict(expected=expected, status=status)


def test_exit_code_counts_only_parts_expected_on_this_device():
    ok = dict(a=_part("ok"), b=_part("ok"))
    assert gpu_check.exit_code(ok) == 0
    assert gpu_check.exit_code({**ok, "graph": _part("skipped", expected=False)}) == 0
    for status in ("partial", "failed", "skipped"):  # an expected part that did not fully run fails the check
        assert gpu_check.exit_code({**ok, "c": _part(status)}) == 1


def test_combine_pieces():
    def pieces(*statuses):
        return {str(i): dict(status=s) for i, s in enumerate(statuses)}

    assert gpu_check.combine(pieces("ok", "ok")) == "ok"
    assert gpu_check.combine(pieces("ok", "skipped")) == "ok"  # e.g. Transformer Engine on CPU
    assert gpu_check.combine(pieces("ok", "unavailable")) == "partial"
    assert gpu_check.combine(pieces("ok", "failed")) == "partial"
    assert gpu_check.combine(pieces("failed", "unavailable")) == "failed"
    with pytest.raises(ValueError):
        gpu_check.combine({})


def _megatron_log(iterations, timers=True, loss="8.346254E+00"):
    """The lines of megatron.training's log that the parser reads, in its format (megatron-core 0.19.2)."""
    lines = ["------------------------ arguments ------------------------",
             "  bf16 ............................................ True",
             "  transformer_impl ................................ local",
             "INFO:megatron.core.timers:(min, max) time across ranks (ms):",
             "    model-and-optimizer-setup ......................: (186.13, 186.13)"]
    for i in range(1, iterations + 1):
        lines.append(f" [2026-12-06 12:20:23.545665] iteration {i:8d}/{iterations:8d} | consumed samples: "
                     f"{2 * i:12d} | elapsed time per iteration (ms): {100.0 * i:.1f} | learning rate: 2.250000E-03 "
                     f"| global batch size:     2 | lm loss: {loss} | loss scale: 1.0 | grad norm: 1.840 | "
                     f"number of skipped iterations:   0 | number of nan iterations:   0 |")
        if timers:
            lines += ["INFO:megatron.core.timers:(min, max) time across ranks (ms):",
                      f"    forward-backward ...............................: ({60.0 * i - 1:.2f}, {60.0 * i:.2f})",
                      f"    optimizer ......................................: ({10.0 * i - 1:.2f}, {10.0 * i:.2f})"]
    return "\n".join(lines) + "\n"


def test_training_log_is_parsed_and_summarized():
    parsed = gpu_check.parse_training_log(_megatron_log(6))
    assert parsed["arguments"]["transformer_impl"] == "local" and parsed["arguments"]["bf16"] == "True"
    its = parsed["iterations"]
    assert [r["iteration"] for r in its] == [1, 2, 3, 4, 5, 6] and its[0]["loss"] == 8.346254
    # The max over ranks (the second number), and the setup timers before iteration 1 belong to no iteration.
    assert its[1]["timers"] == {"forward-backward": 120.0, "optimizer": 20.0}
    summary = gpu_check.summarize_training(parsed, train_iters=6)
    assert summary["status"] == "ok", summary
    assert summary["warmup_iterations"] == gpu_check.WARMUP_ITERATIONS == 3
    # Iterations 4..6 only: step 400/500/600 ms, optimizer 40/50/60 ms.
    assert summary["step_ms"] == 500.0 and summary["optimizer_ms"] == 50.0
    assert summary["optimizer_share"] == pytest.approx(0.1)
    assert summary["timers_ms"]["forward-backward"] == 300.0 and summary["transformer_impl"] == "local"


@pytest.mark.parametrize("log, train_iters, problem", [
    (_megatron_log(4), 6, "logged 4 of 6 iterations"),
    (_megatron_log(6, timers=False), 6, "'optimizer' timer is missing"),
    (_megatron_log(6, loss="nan"), 6, "non-finite"),
    ("Traceback (most recent call last):\n", 6, "logged 0 of 6"),
])
def test_training_summary_fails_on_what_is_missing(log, train_iters, problem):
    summary = gpu_check.summarize_training(gpu_check.parse_training_log(log), train_iters)
    assert summary["status"] == "failed" and problem in summary["error"]
    assert "step_ms" not in summary  # no number from a run that did not log what it had to


def _ns_row(method, note=None, ms=1.0):
    return dict(shape="64x64", method=method, ns_method="standard", resolved_method="standard", precision="bf16",
                coefficients="jordan", ms=None if note else ms, tflops=None, polar_err=None, rounding_dev=None,
                note=note)


def test_orthogonalize_summary_fails_on_our_rows_only(tmp_path):
    path = tmp_path / "o.json"

    def summary(rows):
        path.write_text(json.dumps(dict(metadata=dict(device="cpu", notes=[]), rows=rows)))
        return gpu_check.summarize_orthogonalize(path)

    baseline_broke = summary([_ns_row("megatron_muon"), _ns_row("torch.optim.Muon", note="failed: RuntimeError: x"),
                              _ns_row("megatron_muon", note="unstable in fp8")])
    assert baseline_broke["status"] == "ok"
    counts = ("rows_run", "rows_failed", "rows_listed_not_run")
    assert [baseline_broke[k] for k in counts] == [1, 1, 1]
    ours_broke = summary([_ns_row("megatron_muon"), _ns_row("megatron_muon", note="failed: RuntimeError: y")])
    assert ours_broke["status"] == "failed" and "RuntimeError: y" in ours_broke["error"]
    assert summary([_ns_row("megatron_muon", note="unstable in fp8")])["status"] == "failed"


def test_cpu_subset_end_to_end(tmp_path):
    """The smallest CPU run: every part runs or says why not, the JSON has its documented shape, and the exit
    status is the rule applied to the parts."""
    out = tmp_path / "gpu-check-cpu.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--json", str(out), "--optimizers", "muon", "adam",
         "--train-iters", "4", "--ns-repeats", "1", "--step-ops-layers", "1", "2"],
        capture_output=True, text=True, timeout=600)
    assert out.exists(), result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert result.returncode == report["exit_code"] == gpu_check.exit_code(report["parts"]), result.stdout
    assert report["device"] == dict(type="cpu", name=report["device"]["name"], slug="cpu", capability=None)
    assert report["ran_on_gpu"] is False and report["environment"]["torch"]
    assert list(report["parts"]) == list(gpu_check.PARTS)
    log = pathlib.Path(report["log"])
    assert log == out.with_suffix(".log") and "===== [training/muon]" in log.read_text()

    ns = report["parts"]["newton_schulz"]
    assert ns["status"] == "ok", ns
    fp8 = ns["pieces"]["fp8_gemm_vs_fp64"]["backends"]
    assert fp8["torch"]["status"] == "ok"
    tolerance = ns["pieces"]["fp8_gemm_vs_fp64"]["tolerance"]
    assert all(0 < e <= tolerance for e in fp8["torch"]["relative_error_vs_fp64"].values())
    assert fp8["transformer_engine"]["status"] == "skipped" and "CUDA" in fp8["transformer_engine"]["reason"]
    tiny = ns["pieces"]["tiny_cpu"]
    assert tiny["rows_run"] > 0 and tiny["rows_failed"] == 0
    ran = [r for r in tiny["rows"] if r["method"] == "megatron_muon" and r["ms"] is not None]
    assert {r["precision"] for r in ran} == {"fp32", "bf16", "fp16", "fp8", "fp8>bf16"}
    assert {r["ns_method"] for r in ran} == {"standard", "gram", "auto"}
    assert all(math.isfinite(r["rounding_dev"]) for r in ran)

    training = report["parts"]["training"]
    assert training["status"] == "ok" and list(training["pieces"]) == ["muon", "adam"], training
    for piece in training["pieces"].values():
        assert piece["iterations_logged"] == 4 and piece["transformer_impl"] == "local", piece
        assert piece["step_ms"] > 0 and 0 < piece["optimizer_share"] < 1

    graph = report["parts"]["cuda_graph"]
    assert graph["expected"] is False and graph["status"] == "skipped" and "needs CUDA" in graph["reason"]

    ops = report["parts"]["op_counts"]
    profiler = ops["pieces"]["profiler"]
    assert profiler["status"] == "ok", profiler
    for entry in profiler["optimizers"].values():
        assert entry["aten_ops_outermost"] > 0 and entry["cuda_kernels"] is None and entry["cuda_kernels_reason"]
    step_ops = ops["pieces"]["step_ops"]
    assert step_ops["status"] == "ok" or step_ops.get("error") or step_ops.get("reason"), step_ops
    if step_ops["status"] == "ok":
        assert set(step_ops["rows"]) == {"muon", "adam"}


def test_a_failed_graph_capture_is_recorded_and_the_next_attempt_still_runs(monkeypatch):
    """_capture_attempts' control flow with CUDA stood in for (no GPU here): the first capture fails the way a
    host read inside capture does (the capture's end raises again), the second captures and replays."""
    import contextlib
    import types

    import torch

    calls = []

    class Stream:
        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            calls.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        try:
            yield
        except RuntimeError:
            raise RuntimeError("capture invalidated when the capture ended")

    for name, value in dict(Stream=Stream, current_stream=Stream, stream=lambda s: contextlib.nullcontext(),
                            CUDAGraph=Graph, graph=capture).items():
        monkeypatch.setattr(torch.cuda, name, value)

    def wrapper_step():
        raise RuntimeError("operation not permitted when stream is capturing")

    inner = types.SimpleNamespace(step=lambda: calls.append("inner step"))
    optimizer = types.SimpleNamespace(step=wrapper_step, chained_optimizers=[types.SimpleNamespace(optimizer=inner)])
    rig = types.SimpleNamespace(trainer=types.SimpleNamespace(optimizer=optimizer), gradients=lambda: None,
                                step=lambda: calls.append("warm-up step"), sync=lambda: None)
    attempts = {}
    gpu_check._capture_attempts(rig, attempts)

    assert list(attempts) == list(gpu_check.GRAPH_ATTEMPTS)
    failed, captured = attempts["megatron_optimizer_step"], attempts["inner_optimizer_step"]
    assert failed["captured"] is False
    # Both errors, the informative one (what capture refused) included.
    assert "capture invalidated" in failed["error"] and "not permitted when stream is capturing" in failed["error"]
    assert captured["captured"] is True and captured["replay_ms"] >= 0 and captured["eager_ms"] >= 0
    assert calls == ["warm-up step"] * gpu_check.STEP_WARMUP + ["inner step"] + ["replay"] * 5 + ["inner step"]
