"""Shared helpers for the bench scripts: timing, peak memory, device description, JSON output.

Timing: warm-up calls, then the median of `repeats` timed calls. On CUDA each call is timed
with CUDA events; on CPU with perf_counter. Peak memory: on CUDA, the peak of
torch.cuda.max_memory_allocated during one call minus what was allocated before it (so the
inputs are not counted, everything the call allocates is, including returned tensors and
gradients); on CPU it is not measured (None).
"""

from __future__ import annotations

import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Peak HBM bandwidth in GB/s by device-name pattern, first match wins (vendor datasheets).
PEAK_BANDWIDTH_GBPS = (
    (r"H200", 4800.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100.*NVL", 3900.0),
    (r"H100", 3350.0),  # SXM5, "NVIDIA H100 80GB HBM3"
)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.MULTILINE)
        if match:
            return match.group(1).strip()
    return platform.processor() or platform.machine()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def peak_bandwidth_gbps(name: str) -> float | None:
    for pattern, gbps in PEAK_BANDWIDTH_GBPS:
        if re.search(pattern, name):
            return gbps
    return None


def environment(device: torch.device) -> dict:
    """Device name, library versions and peak bandwidth, for the JSON header."""
    import triton

    name = device_name(device)
    info = {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "peak_bandwidth_gbps": peak_bandwidth_gbps(name) if device.type == "cuda" else None,
        "python": platform.python_version(),
    }
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> float:
    """Median wall time of fn() in milliseconds."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory one fn() call allocates on top of what is live before it (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def save_json(payload: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return path


def fmt(value: float | None, spec: str = ".2f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def measure(
    forward: Callable[[], object],
    forward_backward: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    repeats: int,
) -> dict:
    """Time and peak memory of a forward-only and a forward+backward callable.

    A method that fails (torch.compile unavailable, out of memory) is a result too: its
    exception is returned under "error" (and the other figures are None) instead of ending
    the run.
    """
    result = {"fwd_ms": None, "fwdbwd_ms": None, "fwd_peak_extra_bytes": None, "fwdbwd_peak_extra_bytes": None}
    try:
        result["fwd_ms"] = time_ms(forward, device, warmup=warmup, repeats=repeats)
        result["fwd_peak_extra_bytes"] = peak_extra_bytes(forward, device)
        result["fwdbwd_ms"] = time_ms(forward_backward, device, warmup=warmup, repeats=repeats)
        result["fwdbwd_peak_extra_bytes"] = peak_extra_bytes(forward_backward, device)
    except Exception as exc:  # recorded in the results, see docstring
        result["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    free_memory(device)
    return result


# --- "ours against baselines" benches (bench/logprobs.py, bench/kl.py) ----------------------


def add_common_args(parser, method_names: list[str]) -> None:
    parser.add_argument("--full", action="store_true", help="the GPU sizes on any device (default on CUDA)")
    parser.add_argument("--n", type=int, nargs="+", help="token counts (overrides the defaults)")
    parser.add_argument("--v", type=int, nargs="+", help="vocabulary sizes (overrides the defaults)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=None, help="default 5 on CUDA, 2 on CPU")
    parser.add_argument("--repeats", type=int, default=None, help="default 20 on CUDA, 5 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--methods", nargs="+", default=method_names, choices=method_names)
    parser.add_argument("--out", default=None, help="JSON path (default bench/results/<bench>-<device>.json)")


def resolve_args(args, device: torch.device, *, gpu_n, gpu_v, cpu_n, cpu_v) -> tuple[list[int], list[int]]:
    """Fill in device-dependent defaults; returns (token counts, vocabulary sizes)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    big = args.full or device.type == "cuda"
    args.warmup = args.warmup if args.warmup is not None else (5 if device.type == "cuda" else 2)
    args.repeats = args.repeats if args.repeats is not None else (20 if device.type == "cuda" else 5)
    return args.n or (gpu_n if big else cpu_n), args.v or (gpu_v if big else cpu_v)


def add_bandwidth(row: dict, bytes_read: int, device: torch.device) -> None:
    """Forward GB/s from the bytes the forward must read, and its fraction of the device peak."""
    if row["fwd_ms"] is None:
        return
    gbps = bytes_read / (row["fwd_ms"] * 1e-3) / 1e9
    peak = peak_bandwidth_gbps(device_name(device)) if device.type == "cuda" else None
    row["fwd_gbps"] = gbps
    row["fwd_bandwidth_fraction"] = None if peak is None else gbps / peak


def summarize(rows: list[dict], device: torch.device) -> dict:
    """"ours" against "eager" and the other methods for one config; the issue's targets on CUDA:
    fwd+bwd >= 2x eager and >= the best other, peak extra memory <= 10 % of eager's (forward;
    the fwd+bwd figure includes the (N, V) gradient every method returns, also reported),
    forward >= 70 % of peak bandwidth."""
    by_name = {r["method"]: r for r in rows}
    mine, eager = by_name.get("ours"), by_name.get("eager")
    if mine is None or eager is None or mine.get("error") or eager.get("error"):
        return {"note": "ours or eager missing or failed; no comparison"}
    others = [r["fwdbwd_ms"] for k, r in by_name.items() if k not in ("ours", "eager") and r["fwdbwd_ms"] is not None]
    summary = {
        "fwd_speedup_vs_eager": eager["fwd_ms"] / mine["fwd_ms"],
        "fwdbwd_speedup_vs_eager": eager["fwdbwd_ms"] / mine["fwdbwd_ms"],
        "fwdbwd_speedup_vs_best_other": min(others) / mine["fwdbwd_ms"] if others else None,
    }
    if device.type == "cuda":
        summary["fwd_mem_fraction_of_eager"] = mine["fwd_peak_extra_bytes"] / eager["fwd_peak_extra_bytes"]
        summary["fwdbwd_mem_fraction_of_eager"] = mine["fwdbwd_peak_extra_bytes"] / eager["fwdbwd_peak_extra_bytes"]
        best_other = summary["fwdbwd_speedup_vs_best_other"]
        summary["targets_met"] = {
            "fwdbwd_2x_eager": summary["fwdbwd_speedup_vs_eager"] >= 2.0,
            "fwdbwd_at_least_best_other": best_other is None or best_other >= 1.0,
            "fwd_mem_le_10pct_eager": summary["fwd_mem_fraction_of_eager"] <= 0.10,
            "fwd_bandwidth_ge_70pct": (mine.get("fwd_bandwidth_fraction") or 0.0) >= 0.70,
        }
    return summary


def print_table(rows: list[dict], summaries: dict) -> None:
    def mib(b):
        return None if b is None else b / 2**20

    header = (
        f"{'N':>6} {'V':>7} {'method':<14} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd GB/s':>9} {'%peak':>6} "
        f"{'fwd MiB':>9} {'f+b MiB':>9} {'max err':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if r.get("error"):
            print(f"{r['N']:>6} {r['V']:>7} {r['method']:<14} error: {r['error'][:90]}")
            continue
        frac = r.get("fwd_bandwidth_fraction")
        print(
            f"{r['N']:>6} {r['V']:>7} {r['method']:<14} {r['fwd_ms']:>9.2f} {r['fwdbwd_ms']:>11.2f} "
            f"{r['fwd_gbps']:>9.2f} {fmt(None if frac is None else 100 * frac, '.0f'):>6} "
            f"{fmt(mib(r['fwd_peak_extra_bytes']), '.1f'):>9} {fmt(mib(r['fwdbwd_peak_extra_bytes']), '.1f'):>9} "
            f"{r['max_abs_err']:>9.2e}"
        )
    for key, s in summaries.items():
        print(f"{key}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))


def time_methods(methods: dict[str, Callable], logits, other, grad_out, ref, err_rows: int, fwd_bytes: int,
                 device: torch.device, args, progress) -> list[dict]:
    """Time every selected method `fn(logits, other)` forward and forward+backward (w.r.t. the
    logits), add bandwidth and the max abs error on the first `err_rows` rows against `ref`."""
    rows = []
    B, T, V = logits.shape
    for name, fn in methods.items():
        if name not in args.methods:
            continue
        progress.set_description(f"N={B * T} V={V} {name}")
        leaf = logits.detach().requires_grad_(True)

        def forward(fn=fn):
            with torch.no_grad():
                return fn(logits, other)

        def forward_backward(fn=fn, leaf=leaf):
            return torch.autograd.grad(fn(leaf, other), leaf, grad_out)

        row = {"method": name, "N": B * T, "V": V, "dtype": str(logits.dtype).removeprefix("torch.")}
        row.update(measure(forward, forward_backward, device, warmup=args.warmup, repeats=args.repeats))
        add_bandwidth(row, fwd_bytes, device)
        if row["fwd_ms"] is not None:
            row["max_abs_err"] = float((forward()[0, :err_rows].double() - ref).abs().max())
        rows.append(row)
        progress.update(1)
    return rows


def run_bench(name: str, doc: str, methods: Callable[[], dict], bench_config: Callable, seq_len: int,
              argv: list[str] | None) -> int:
    """The shared main of bench/logprobs.py and bench/kl.py: sizes, loop, table, JSON."""
    import argparse
    import sys

    from tqdm import tqdm

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, list(methods()))
    args = parser.parse_args(argv)
    device = pick_device()
    n_list, v_list = resolve_args(args, device, gpu_n=[8192, 16384], gpu_v=[32000, 151936], cpu_n=[1024], cpu_v=[32000])
    dtype = getattr(torch, args.dtype)
    env = environment(device)
    ours_backend = "triton" if device.type == "cuda" else "torch (chunked fallback: the Triton kernels run on CUDA)"

    rows, summaries = [], {}
    with tqdm(total=len(n_list) * len(v_list) * len(args.methods), file=sys.stderr) as progress:
        for n_tokens in n_list:
            for vocab in v_list:
                config_rows = bench_config(n_tokens, vocab, dtype, device, args, progress)
                rows += config_rows
                summaries[f"N={n_tokens},V={vocab}"] = summarize(config_rows, device)

    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  ours runs: {ours_backend}")
    print_table(rows, summaries)
    payload = {
        "benchmark": name,
        **env,
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
        "ours_backend": ours_backend,
        "memory_measured": device.type == "cuda",
        "settings": {"dtype": args.dtype, "seq_len": seq_len, "warmup": args.warmup, "repeats": args.repeats},
        "results": rows,
        "summary": summaries,
    }
    out = args.out or RESULTS_DIR / f"{name}-{slug(env['device'])}.json"
    print(f"saved {save_json(payload, Path(out))}")
    return 0
