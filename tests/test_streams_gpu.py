"""Every GPU op runs on the caller's current stream (GPU only).

A stream test that only runs an op on a side stream and compares results passes whichever stream the kernel
takes: the inputs were ready long before. Here the op's input is written on the side stream right before the
call, behind a long sleep on that stream: a kernel launched on the side stream reads the written values, one
launched on any other stream (pool streams do not wait for the legacy default stream, nor it for them) runs
during the sleep and reads the zeros that were there before.

Not covered here: a kernel's intermediate buffers (the int linears' codes) come from the side stream's
allocator pool and are not poisoned, so a later kernel of the same op on a wrong stream could read codes an
earlier case left; and the programmatic dependent launch of the small-M kernels, which happens only inside a
CUDA graph, after one of our kernels (tests/test_int_gemm.py and tests/test_w4a16_cuda.py chain them in graphs).
"""

import functools

import pytest
import torch

from quantkern import backends, ops, reference

pytestmark = pytest.mark.gpu

SLEEP_CYCLES = 1 << 26  # tens of milliseconds at H100/H200 clocks: far longer than any launch takes


def behind_busy_stream(op, *inputs):
    """``op(*copies)`` on a side stream, the copies of ``inputs`` written there right before, after a sleep."""
    copies = [torch.zeros_like(t) for t in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())  # the zeros and any prepared weight are ready
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        for copy, source in zip(copies, inputs):
            copy.copy_(source)
        result = op(*copies)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return result


def assert_same(got, expected):
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def needs(backend, op):
    st = backends.status(backend)
    if not torch.cuda.is_available() or op not in st.kernels:
        pytest.skip(f"no {backend} {op}: {st.reason}")


def random(*shape, dtype=torch.float16, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to("cuda", dtype)


@functools.lru_cache(maxsize=None)
def rotation128():
    """An orthogonal [128, 128] rotation on the GPU, made once (outside the timed stream)."""
    return torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(0)))[0].to("cuda")


ACTIVATION_OPS = {  # name: (op, how it is called); the Hadamard ops at 4096, 576 (36 x 16) and in blocks
    "quantize_per_token": ("quantize_per_token", lambda x, b: ops.quantize_per_token(x, 4, backend=b)),
    "hadamard": ("hadamard", lambda x, b: ops.hadamard(x, backend=b)),
    "hadamard_blocks": ("hadamard", lambda x, b: ops.hadamard(x, backend=b, block_size=128)),
    "hadamard_quantize": ("hadamard_quantize", lambda x, b: ops.hadamard_quantize(x, 4, 0.9, backend=b)),
    "hadamard_quantize_576": ("hadamard_quantize", lambda x, b: ops.hadamard_quantize(x[:, :576], 8, backend=b)),
    "hadamard_quantize_blocks": ("hadamard_quantize",
                                 lambda x, b: ops.hadamard_quantize(x, 4, backend=b, block_size=128)),
    "block_rotate_quantize": ("block_rotate_quantize",
                              lambda x, b: ops.block_rotate_quantize(x, rotation128(), 4, backend=b)),
}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", sorted(ACTIVATION_OPS))
@pytest.mark.parametrize("rows", [1, 16])
def test_activation_ops_run_on_the_current_stream(backend, name, rows):
    op, call = ACTIVATION_OPS[name]
    needs(backend, op)
    x = random(rows, 4096, dtype=torch.bfloat16)
    expected = call(x, backend)  # (also compiles and autotunes the Triton kernels outside the timed stream)
    torch.cuda.synchronize()
    assert_same(behind_busy_stream(lambda t: call(t, backend), x), expected)


@pytest.mark.parametrize("name", ["quantize_kv", "block_rotate", "block_rotate_quantize"])
def test_triton_only_ops_run_on_the_current_stream(name):
    needs("triton", name)
    rotation = torch.linalg.qr(torch.randn(128, 128, dtype=torch.float64))[0].to("cuda")
    call = {"quantize_kv": lambda t: ops.quantize_kv(t, 4, backend="triton"),  # [tokens, heads, head_dim]
            "block_rotate": lambda t: ops.block_rotate(t, rotation, backend="triton"),
            "block_rotate_quantize": lambda t: ops.block_rotate_quantize(t, rotation, 4, backend="triton")}[name]
    x = random(16, 8, 128) if name == "quantize_kv" else random(16, 4096)
    expected = call(x)
    torch.cuda.synchronize()
    assert_same(behind_busy_stream(call, x), expected)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("mode", ["w4a16", "w4a4", "w8a8", "w4a8", "w4a4-rotated"])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64, 256])  # the small-M, wgmma and tiled paths
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_layers_run_on_the_current_stream(backend, mode, tokens, dtype):
    bits, act_bits = {"w4a16": (4, None), "w4a4": (4, 4), "w8a8": (8, 8), "w4a8": (4, 8), "w4a4-rotated": (4, 4)}[mode]
    needs(backend, "weight_only_linear" if act_bits is None else f"w{bits}a{act_bits}_linear")
    weight = reference.quantize_weight(random(1024, 4096, dtype=torch.float32, seed=1), bits,
                                       128 if act_bits is None else -1, True, dtype)
    bias = random(1024, dtype=dtype, seed=3)
    if act_bits is None:
        prepared = ops.prepare_weight_only(weight, dtype, backend)
        call = lambda t: ops.weight_only_linear(t, prepared, bias)  # noqa: E731
    else:
        rotation = "hadamard" if mode.endswith("rotated") else None
        prepared = ops.prepare_int_weight(weight, act_bits, dtype, backend)
        call = lambda t: ops.quantized_activation_linear(t, prepared, act_bits, bias,  # noqa: E731
                                                         input_rotation=rotation)
    x = random(tokens, 4096, dtype=dtype, seed=2)
    expected = call(x)
    torch.cuda.synchronize()
    assert_same(behind_busy_stream(call, x), expected)
