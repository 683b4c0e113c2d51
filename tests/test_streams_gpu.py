"""Every GPU op runs on the caller's current stream (GPU only).

A stream test that only runs an op on a side stream and compares results passes whichever stream the kernel
takes: the inputs were ready long before. Here the op's input is written on the side stream right before the
call, behind a long sleep on that stream: a kernel launched on the side stream reads the written values, one
launched on any other stream runs during the sleep and reads the zeros that were there before. The small-M
W4A16 and integer kernels also start early, in the previous kernel's tail (programmatic dependent launch):
here that previous kernel is the copy that writes their input, which they must wait for.
"""

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


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("op, call", [
    ("quantize_per_token", lambda x, b: ops.quantize_per_token(x, 4, backend=b)),
    ("hadamard", lambda x, b: ops.hadamard(x, backend=b)),
    ("hadamard_quantize", lambda x, b: ops.hadamard_quantize(x, 4, 0.9, backend=b)),
    ("quantize_kv", lambda x, b: ops.quantize_kv(x, 4, backend=b)),
], ids=["quantize_per_token", "hadamard", "hadamard_quantize", "quantize_kv"])
@pytest.mark.parametrize("rows", [1, 16])
def test_activation_ops_run_on_the_current_stream(backend, op, call, rows):
    needs(backend, op)
    x = random(rows, 8, 128) if op == "quantize_kv" else random(rows, 4096, dtype=torch.bfloat16)  # kv: heads
    expected = call(x, backend)
    torch.cuda.synchronize()
    assert_same(behind_busy_stream(lambda t: call(t, backend), x), expected)


def test_block_rotation_runs_on_the_current_stream():
    needs("triton", "block_rotate_quantize")
    x, rotation = random(16, 4096), torch.linalg.qr(torch.randn(128, 128, dtype=torch.float64))[0].to("cuda")
    expected = ops.block_rotate_quantize(x, rotation, 4, backend="triton")
    torch.cuda.synchronize()
    assert_same(behind_busy_stream(lambda t: ops.block_rotate_quantize(t, rotation, 4, backend="triton"), x),
                expected)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("act_bits", [None, 4, 8])
@pytest.mark.parametrize("tokens", [1, 5, 16, 64, 256])  # the small-M, wgmma and tiled paths
def test_linear_layers_run_on_the_current_stream(backend, act_bits, tokens):
    op = {None: "weight_only_linear", 4: "w4a4_linear", 8: "w8a8_linear"}[act_bits]
    needs(backend, op)
    bits = 8 if act_bits == 8 else 4
    weight = reference.quantize_weight(random(1024, 4096, dtype=torch.float32, seed=1), bits,
                                       128 if act_bits is None else -1, True, torch.float16)
    if act_bits is None:
        prepared = ops.prepare_weight_only(weight, torch.float16, backend)
        call = lambda t: ops.weight_only_linear(t, prepared)  # noqa: E731
    else:
        prepared = ops.prepare_int_weight(weight, act_bits, torch.float16, backend)
        call = lambda t: ops.quantized_activation_linear(t, prepared, act_bits)  # noqa: E731
    x = random(tokens, 4096, seed=2)
    expected = call(x)
    torch.cuda.synchronize()
    assert_same(behind_busy_stream(call, x), expected)
