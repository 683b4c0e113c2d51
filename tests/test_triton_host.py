"""``triton_kernels._host``: plain eager calls skip the dispatcher, traced ones go through the op; the
host-side integer helpers equal Triton's.

The routing is observed, not assumed: a counting dispatch mode sees which calls reach the registered
op. Runs on the GPU, or on the CPU under TRITON_INTERPRET=1 (set by conftest.py).
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from quantkern import reference
from quantkern.triton_kernels._host import _traced
from quantkern.triton_kernels.activation_quant import _quantize_per_token_op
from quantkern.triton_kernels.w4a16 import _w4a16_gemm_op, prepare_w4a16

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class CountOps(TorchDispatchMode):
    """Counts the calls of each op that reach the dispatcher's Python modes."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _w4a16_args(k=64, n=32, m=3):
    gen = torch.Generator().manual_seed(0)
    qw = reference.quantize_weight(torch.randn(n, k, generator=gen), 4, 32, symmetric=True,
                                   scale_dtype=torch.float16).to(DEVICE)
    p = prepare_w4a16(qw, torch.float16)
    x = torch.randn(m, k, generator=gen).half().to(DEVICE)
    return x, (x, p["qweight"], p["scales"], None, None, p["group_len"], k)


def test_plain_tensors_are_not_traced():
    x, args = _w4a16_args()
    assert not _traced(args)


def test_eager_call_matches_the_registered_op():
    _, args = _w4a16_args()
    direct = _w4a16_gemm_op(*args)
    through_op = _w4a16_gemm_op.op(*args)
    assert direct.dtype == torch.float16 and direct.shape == (3, 32)
    assert torch.equal(direct, through_op)
    q, s = _quantize_per_token_op(args[0], 8, 1.0)
    q_op, s_op = _quantize_per_token_op.op(args[0], 8, 1.0)
    assert torch.equal(q, q_op) and torch.equal(s, s_op)


def test_a_dispatch_mode_routes_through_the_op():
    _, args = _w4a16_args()
    expected = _w4a16_gemm_op(*args)
    with CountOps() as mode:
        assert _traced(args)
        y = _w4a16_gemm_op(*args)
    assert "quantkern_triton.w4a16_gemm.default" in mode.seen
    assert torch.equal(y, expected)


def test_fake_and_meta_tensors_route_through_the_op():
    _, args = _w4a16_args()
    with FakeTensorMode(allow_non_fake_inputs=False) as fake_mode:
        fake_args = tuple(fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        y = _w4a16_gemm_op(*fake_args)
    assert y.shape == (3, 32) and y.dtype == torch.float16
    meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
    assert _traced(meta_args)
    y = _w4a16_gemm_op(*meta_args)
    assert y.is_meta and y.shape == (3, 32)


def test_compiled_call_uses_the_op():
    x, args = _w4a16_args()
    rest = args[1:]
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    def f(x):
        return _w4a16_gemm_op(x, *rest) + 1

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    assert torch.equal(compiled(x), f(x))
    assert "quantkern_triton.w4a16_gemm.default" in seen


def test_bad_input_errors_are_the_same_both_ways():
    x, args = _w4a16_args()
    bad = (x.float(),) + args[1:]
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _w4a16_gemm_op(*bad)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        _w4a16_gemm_op.op(*bad)


def test_integer_helpers_match_triton():
    import triton

    from quantkern.triton_kernels._host import cdiv, next_power_of_2

    for a in (0, 1, 2, 3, 15, 16, 17, 576, 4095, 4096, 4097, 14336, 28672):
        assert next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 8, 16, 32, 64, 128, 256):
            assert cdiv(a, b) == triton.cdiv(a, b)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_jit_trace_records_the_op():
    x, args = _w4a16_args()
    rest = args[1:]

    def f(x):
        return _w4a16_gemm_op(x, *rest)

    traced = torch.jit.trace(f, (x,), check_trace=False)
    assert "quantkern_triton::w4a16_gemm" in str(traced.graph)
    assert torch.equal(traced(x), f(x))


def test_plain_eager_call_skips_the_dispatcher():
    # The profiler records every op that passes through the dispatcher (it is not a dispatch mode, so it
    # does not itself route the call through the op): the eager call must not show up, the op call must.
    _, args = _w4a16_args()

    def dispatched_names(call):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
        return {event.name for event in prof.events()}

    assert "quantkern_triton::w4a16_gemm" not in dispatched_names(lambda: _w4a16_gemm_op(*args))
    assert "quantkern_triton::w4a16_gemm" in dispatched_names(lambda: _w4a16_gemm_op.op(*args))
