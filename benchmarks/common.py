"""Shared helpers for quantkern's benchmarks: timing, the device's copy bandwidth, and JSON results
that record the device, versions and commit next to every figure."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch


# The issues' speed targets (set on the H100), for the benchmarks that print whether a row meets them.
W4A16_TARGETS = {1: 3.5, 16: 3.3, 64: 2.5, 2048: 0.9}  # tokens M: speed-up over cuBLAS fp16 (issue 3)
W4A4_FEW_TOKENS, W4A4_FEW_TOKENS_TARGET = 16, 3.0  # M <= 16: W4A4 over cuBLAS bf16 (issue 5)
W4A4_MANY_TOKENS, W4A4_MANY_TOKENS_TARGET = (2048, 8192), 1.5  # ... and faster than torch._int_mm + quantization
HADAMARD_QUANTIZE_TARGET = 0.85  # fused Hadamard + int4 quantization: fraction of the copy bandwidth (issue 5)


def verdict(ratio: float, target: float) -> str:
    """``">=3.5x met"`` or ``">=3.5x MISSED"``."""
    return f">={target:g}x {'met' if ratio >= target else 'MISSED'}"


def int_linear_verdicts(m: int, times: dict) -> str:
    """Issue 5's targets that apply at ``m`` tokens, from one row's times (us: w4a4, w8a8, bf16, int_mm or None)."""
    parts = []
    if m <= W4A4_FEW_TOKENS:
        parts.append("w4a4/bf16 " + verdict(times["bf16"] / times["w4a4"], W4A4_FEW_TOKENS_TARGET))
    if m in W4A4_MANY_TOKENS:
        parts.append("w4a4/bf16 " + verdict(times["bf16"] / times["w4a4"], W4A4_MANY_TOKENS_TARGET))
        if times.get("int_mm"):
            parts.append("w4a4/int_mm " + verdict(times["int_mm"] / times["w4a4"], 1.0))
    if times.get("int_mm"):
        parts.append("w8a8/int_mm " + verdict(times["int_mm"] / times["w8a8"], 1.0))
    return "; ".join(parts)


def median_us(fn, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of ``fn()`` in microseconds, timed with CUDA events (triton.testing.do_bench)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1e3


# CUDA-graph timing with weights rotated past the L2 cache (50 MB on the H100 and the H200): each timed call
# reads another copy, so each streams its weights from memory.
ROTATE_BYTES = 200 << 20  # a weight's copies together at least this
# (The cap was 8: small weights' copies then fit in the L2 together, e.g. 8 int4 copies of 896 x 4864 make 17 MB
# and of 576 x 1536 3.5 MB, while cuBLAS's 8 fp16 copies of 896 x 4864 made 70 MB: ours read the L2, the peer HBM.
# The copies of a weight stay near ROTATE_BYTES together whatever the cap, so it only bounds the count.)
MAX_COPIES = 1024


def graph_us(fn) -> float:
    """Median microseconds of ``fn()`` over CUDA-graph replays (``do_bench_cudagraph``: no host time)."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3


def copies_for(nbytes: int) -> int:
    """How many copies of a tensor of ``nbytes`` to rotate over so that together they exceed the L2."""
    return max(1, min(MAX_COPIES, -(-ROTATE_BYTES // max(nbytes, 1))))


def cycling(items):
    """A function returning the next of ``items`` on each call (under CUDA-graph capture each captured
    call then reads another copy)."""
    state = {"i": 0}

    def nxt():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return item
    return nxt


def warm_up_gpu(seconds: float = 1.0) -> None:
    """Keep the GPU busy for a while before timing anything (an idle GPU may still be at low clocks).
    Without it the first shape's rows came out erratic on the H200: cuBLAS 4096 x 4096 took 38-39 us
    at M = 1 and 19-36 us from M = 4 to 32, where the H100 had given 21-24 us throughout."""
    import time

    a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (the roofline to compare with)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (median_us(lambda: dst.copy_(src)) * 1e3)


def commit_info() -> tuple:
    """``(commit, dirty)``: ``QUANTKERN_COMMIT`` where set (the GPU machine gets no .git; dirty then None),
    else git's short HEAD and whether tracked files differ from it; ``(None, None)`` without either."""
    commit, dirty = os.environ.get("QUANTKERN_COMMIT"), None
    try:
        if commit is None:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, check=False).stdout.strip() or None
            if commit is not None:  # (outside a git work tree git status fails: no verdict, not "clean")
                dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                            capture_output=True, text=True, cwd=Path(__file__).parent,
                                            check=False).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return commit, dirty


def environment() -> dict:
    commit, dirty = commit_info()
    import triton

    import quantkern

    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "quantkern": quantkern.__version__,
        "commit": commit, "dirty": dirty,
    }


def write_json(path, results: list, extra: dict | None = None) -> None:
    data = {"environment": environment(), **(extra or {}), "results": results}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def print_table(rows: list, headers: list) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(headers, *rows)]
    for cells in [headers, ["-" * w for w in widths], *rows]:
        print("  ".join(str(c).rjust(w) for c, w in zip(cells, widths)))
