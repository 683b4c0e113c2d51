"""pytest-benchmark hooks for the kernels (GPU only; not part of the test suite).

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-json out/pytest-bench.json

Each kernel is timed beside its peer in the same session, so ratios come from one run. The scripts
beside this file (bench_*.py) print the full tables against every peer. Each timed call includes its host
time and a synchronize; the W4A16 weights are rotated over copies past the L2 (benchmarks/common.py), as
4096 x 14336's int4 weights (29 MB) fit in the 50 MB L2 where cuBLAS's fp16 ones (117 MB) do not.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantkern import backends, ops, reference

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copies_for, cycling  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()
    return run


def _rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("rows,features", [(2048, 4096), (2048, 14336)])
@pytest.mark.parametrize("impl", ["cuda", "triton", "torch_compile"])
def test_quantize_per_token(benchmark, impl, rows, features):
    x = torch.randn(rows, features, device="cuda", dtype=torch.bfloat16)
    if impl == "torch_compile":
        fn = torch.compile(reference.quantize_per_token)
        call = lambda: fn(x, 4)  # noqa: E731
    else:
        if "quantize_per_token" not in backends.status(impl).kernels:
            pytest.skip(backends.status(impl).reason)
        call = lambda: ops.quantize_per_token(x, 4, backend=impl)  # noqa: E731
    # A fast wrong kernel is no result: check one call against the reference before timing it.
    q, s = call()
    q_ref, s_ref = reference.quantize_per_token(x, 4)
    if impl != "torch_compile":  # bit-exact, as tests/test_cuda_kernels.py and test_triton_kernels.py assert
        assert torch.equal(s, s_ref) and torch.equal(q, q_ref)
    else:  # Inductor may reorder the fp32 scale arithmetic: an ulp on a scale, a code 1 off at a rounding tie
        torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
        diff = (reference.unpack_int4_signed(q).int() - reference.unpack_int4_signed(q_ref).int()).abs()
        assert diff.max().item() <= 1 and (diff != 0).float().mean().item() <= 0.01
    benchmark(_sync(call))


@pytest.mark.parametrize("m", [1, 16, 2048])
@pytest.mark.parametrize("impl", ["cuda", "triton", "cublas_fp16"])
def test_w4a16_linear_4096x14336(benchmark, impl, m):
    k, n = 4096, 14336
    w = torch.randn(n, k, device="cuda") / k ** 0.5
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    if impl == "cublas_fp16":
        w16 = w.half()
        call = lambda: F.linear(x, w16)  # noqa: E731
        next_w16 = cycling([w16] + [w16.clone() for _ in range(copies_for(2 * n * k) - 1)])
        timed = lambda: F.linear(x, next_w16())  # noqa: E731
    else:
        if "weight_only_linear" not in backends.status(impl).kernels:
            pytest.skip(f"no {impl} W4A16 kernel: {backends.status(impl).reason}")
        qw = reference.quantize_weight(w, 4, 128)
        prepared = ops.prepare_weight_only(qw, torch.float16, impl)
        call = lambda: ops.weight_only_linear(x, prepared)  # noqa: E731
        next_prepared = cycling([prepared] + [ops.prepare_weight_only(qw, torch.float16, impl)
                                              for _ in range(copies_for(n * k // 2) - 1)])
        timed = lambda: ops.weight_only_linear(x, next_prepared())  # noqa: E731
    # A fast wrong kernel is no result: check one call before timing it. quantkern's kernels against the fp32
    # reference within tests/test_w4a16_*.py's 2e-3; the cuBLAS peer (fp16 rounding, fp32 accumulation) only
    # against its own unquantized product, loosely: it is not under test, this catches a wrong operand.
    y = call()
    assert y.shape == (m, n) and y.dtype == torch.float16
    if impl == "cublas_fp16":
        assert _rel_err(y, x.float() @ w.T) <= 1e-2
    else:
        assert _rel_err(y, reference.weight_only_linear(x.float(), qw)) <= 2e-3
    benchmark(_sync(timed))
