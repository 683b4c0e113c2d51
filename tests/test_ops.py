"""quantkern.ops: backend choice, overrides, clear errors, and torch.compile over the public ops."""

import pytest
import torch

from quantkern import backends, ops, reference
from quantkern.backends import MissingKernelError

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


def device_for(backend: str) -> torch.device:
    """Where a backend's kernels take their tensors here: Triton on the GPU when there is one, else under
    TRITON_INTERPRET=1 on the CPU (tests/conftest.py); the reference on the CPU."""
    return CUDA if backend == "triton" and torch.cuda.is_available() else CPU


def test_cpu_tensors_run_the_reference_by_default():
    assert backends.select("quantize_per_token", CPU) == "reference"
    assert backends.select("weight_only_linear", CPU) == "reference"


def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv(backends.ENV_BACKEND, "cuda")
    assert backends.select("quantize_per_token", CPU, backend="reference") == "reference"
    with pytest.raises(MissingKernelError, match="cuda"):
        backends.select("quantize_per_token", CPU)


def test_unknown_backend_is_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        backends.select("quantize_per_token", CPU, backend="fast")
    monkeypatch.setenv(backends.ENV_BACKEND, "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        backends.select("quantize_per_token", CPU)


def test_cuda_tensor_without_kernel_raises_instead_of_falling_back(monkeypatch):
    # Where neither GPU backend can run an op (every op has a Triton kernel, so the backends are made
    # to refuse), a CUDA tensor must raise, never dequantize and multiply silently.
    real_can_run = backends._can_run
    monkeypatch.setattr(backends, "_can_run", lambda name, op, device: (
        real_can_run(name, op, device) if name == "reference" else f"no {name} kernel in this test"))
    for op in backends.OPS:
        with pytest.raises(MissingKernelError, match="does not fall back"):
            backends.select(op, CUDA)
    # ... unless the reference is asked for explicitly.
    assert backends.select(backends.OPS[0], CUDA, backend="reference") == "reference"


@pytest.mark.parametrize("archs, capability, runs", [
    ("8.9", (8, 9), True),
    ("8.0;8.6", (8, 9), True),        # sm_86 machine code runs on a later minor version of the same major
    ("8.9", (8, 6), False),           # ... not on an earlier one
    ("8.9", (9, 0), False),           # ... nor on another major version
    ("8.9;9.0a", (9, 0), True),
    ("9.0a", (9, 0), True),
    ("9.0a", (10, 0), False),         # arch-specific code runs on its own version only
    ("9.0a+PTX", (10, 0), False),
    ("8.9+PTX", (12, 0), True),       # PTX is compiled by the driver for later GPUs
    ("8.9+PTX", (8, 6), False),
    ("8.0 8.6,8.9", (8, 9), True),    # the separators torch accepts
    ("unknown", (9, 0), True),        # a build that did not record its list is not judged
    ("Hopper", (8, 9), True),
])
def test_arch_list_runs_on(archs, capability, runs):
    assert backends.arch_list_runs_on(archs, capability) is runs


def test_cuda_backend_refuses_a_gpu_its_build_has_no_code_for(monkeypatch):
    # An extension built for the RTX 4090 alone (a wheel for sm_89) on an H100: the cuda backend must say so, and the
    # automatic choice go on to Triton, instead of failing at launch with "no kernel image is available".
    monkeypatch.setattr(backends, "_STATUS", {
        "cuda": backends.BackendStatus("cuda", True, "test build", frozenset(backends.EXTENSION_OPS)),
        "triton": backends.BackendStatus("triton", True, "test", frozenset(backends.OPS))})
    monkeypatch.setattr(backends, "_DEVICE_MISMATCH", {})
    monkeypatch.setattr(backends, "cuda_build_info", lambda: {"archs": "8.9"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    gpu = torch.device("cuda", 0)
    with pytest.raises(MissingKernelError, match=r"built for archs 8.9, none of which runs on NVIDIA H100.*sm_90.*"
                                                 r"TORCH_CUDA_ARCH_LIST=9.0a"):
        backends.select("weight_only_linear", gpu, backend="cuda")
    assert backends.select("weight_only_linear", gpu) == "triton"
    # The same build on the GPU it was made for runs the extension.
    monkeypatch.setattr(backends, "_DEVICE_MISMATCH", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 9))
    assert backends.select("weight_only_linear", gpu) == "cuda"


def test_gpu_check_is_not_traced_by_torch_compile(monkeypatch):
    # Ops call select() on every call, also inside a compiled model; build_info() is a pybind11 call that Dynamo
    # cannot trace, so an unchecked device must not reach it while compiling (fullgraph would fail).
    # (Dynamo itself cannot run here with CUDA patched in: it would save the CUDA RNG state; so the compiling
    # state is patched instead.)
    monkeypatch.setattr(backends, "_DEVICE_MISMATCH", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(backends, "cuda_build_info", lambda: pytest.fail("traced into the extension's build info"))
    assert backends.cuda_device_mismatch(torch.device("cuda", 0)) is None
    backends._DEVICE_MISMATCH[0] = "checked eagerly: no code for this GPU"
    assert backends.cuda_device_mismatch(torch.device("cuda", 0)) == "checked eagerly: no code for this GPU"


def test_unloadable_extension_is_told_from_a_missing_one(monkeypatch):
    import importlib.util

    error = ImportError("quantkern/_C.so: undefined symbol: _ZN3c104cuda9SetDevice")  # as from another torch
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    reason = backends._extension_import_problem(error)
    assert "present but cannot be loaded" in reason and "undefined symbol" in reason and torch.__version__ in reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert "is not built" in backends._extension_import_problem(ImportError("No module named 'quantkern._C'"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    # Load the Triton kernels before unsetting the variable: @triton.jit reads it when a kernel module is
    # imported, and kernels imported without it cannot run on the CPU in the tests that follow.
    backends.status("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MissingKernelError, match="TRITON_INTERPRET"):
        backends.select("quantize_per_token", CPU, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.select("quantize_per_token", CPU, backend="triton") == "triton"


def test_report_covers_every_op_and_backend():
    rows = backends.report()
    assert {(op, b) for op, b, _ in rows} == {(op, b) for op in backends.OPS for b in backends.BACKENDS}
    assert all(state == "yes" for op, b, state in rows if b == "reference")


def test_quantize_per_token_keeps_leading_dims_and_copies_non_contiguous_input():
    x = torch.randn(2, 3, 64 * 2)[..., ::2]  # non-contiguous view
    q, scales = ops.quantize_per_token(x, bits=4)
    q_ref, s_ref = reference.quantize_per_token(x.reshape(6, 64).contiguous(), 4)
    assert q.shape == (2, 3, 32) and scales.shape == (2, 3)
    assert torch.equal(q.reshape(6, 32), q_ref) and torch.equal(scales.reshape(6), s_ref)


def test_quantize_per_token_unpacked_int4_codes():
    x = torch.randn(5, 96)
    q, scales = ops.quantize_per_token(x, bits=4)
    q8, scales8 = ops.quantize_per_token(x, bits=4, packed=False)
    assert q8.dtype == torch.int8 and q8.shape == (5, 96) and int(q8.abs().max()) <= 7
    assert torch.equal(q8, reference.unpack_int4_signed(q)) and torch.equal(scales8, scales)
    assert torch.equal(ops.quantize_per_token(x, bits=8, packed=False)[0], ops.quantize_per_token(x, bits=8)[0])


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.quantize_per_token(torch.randn(4, 7), bits=4), ValueError, "even"),
    (lambda: ops.quantize_per_token(torch.randn(4, 8), bits=2), ValueError, "bits"),
    (lambda: ops.quantize_per_token(torch.randn(4, 8).double()), TypeError, "dtype"),
    (lambda: ops.quantize_per_token(torch.randint(0, 4, (4, 8))), TypeError, "dtype"),
    (lambda: ops.quantize_per_token(torch.randn(4, 8), clip_ratio=1.5), ValueError, "clip_ratio"),
    (lambda: ops.quantize_per_token(torch.tensor(1.0)), ValueError, "at least one dimension"),
    (lambda: ops.quantize_per_token([1.0, 2.0]), TypeError, "torch.Tensor"),
    (lambda: ops.quantize_per_token(torch.randn(3, 0)), ValueError, "no features"),  # was a reshape error
    (lambda: ops.hadamard_quantize(torch.randn(3, 0)), ValueError, "no features"),
])
def test_quantize_per_token_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["quantize_per_token", "hadamard", "hadamard_quantize"])
def test_an_empty_last_dimension_is_refused_naming_the_op(name, backend):
    # Clear before, but without the op's name ("x has an empty last dimension", "x has no features").
    with pytest.raises(ValueError, match=rf"^{name}: x has no features: its last dimension is empty \(shape \(2, 3, 0"):
        getattr(ops, name)(torch.zeros(2, 3, 0), backend=backend)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32])
def test_weight_only_linear_names_the_dtype_of_an_integer_x(dtype):
    # Was "dtype must be float16, bfloat16 or float32, got torch.int8": prepare_weight_only's argument, not x.
    g = torch.Generator().manual_seed(0)
    qw = reference.quantize_weight(torch.randn(16, 64, generator=g), 4, 32)
    x = torch.randint(-8, 8, (2, 64), generator=g, dtype=dtype)
    match = rf"weight_only_linear: x must be float16 or bfloat16 \(or float32 on the reference backend\), got {dtype}"
    with pytest.raises(TypeError, match=match):
        ops.weight_only_linear(x, qw)
    with pytest.raises(TypeError, match=match):
        ops.weight_only_linear(x, ops.prepare_weight_only(qw, torch.float32))


def test_linear_ops_bad_input():
    qw = reference.quantize_weight(torch.randn(16, 64), 4, 32)
    with pytest.raises(ValueError, match="last dimension 64"):
        ops.weight_only_linear(torch.randn(2, 32), qw)
    with pytest.raises(TypeError, match="dtype"):
        ops.w4a4_linear(torch.randint(0, 2, (2, 64)), qw)
    with pytest.raises(ValueError, match="8-bit"):
        ops.w8a8_linear(torch.randn(2, 64), qw)


def test_public_ops_compile_without_graph_breaks():
    qw = reference.quantize_weight(torch.randn(32, 128), 4, 64)

    def block(x):
        q, s = ops.quantize_per_token(x, bits=8)
        return ops.weight_only_linear(x, qw) + s[..., None], q

    compiled = torch.compile(block, fullgraph=True, backend="eager")
    x = torch.randn(5, 128)
    y, q = compiled(x)
    y_eager, q_eager = block(x)
    assert torch.equal(q, q_eager) and torch.allclose(y, y_eager)


def test_public_names_after_a_plain_import():
    """``import quantkern`` alone gives the public submodules and names (``quantkern.nn.QuantLinear``, as outside
    checks use it), and every name in ``ops.__all__`` exists. A fresh interpreter: nothing imported before."""
    import subprocess
    import sys

    code = ("import quantkern\n"
            "assert callable(quantkern.nn.QuantLinear.from_linear) and callable(quantkern.replace_linear)\n"
            "assert callable(quantkern.ops.hadamard) and callable(quantkern.io.load_quantized)\n"
            "assert all(hasattr(quantkern.ops, name) for name in quantkern.ops.__all__)\n"
            "assert all(hasattr(quantkern, name) for name in quantkern.__all__)\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        import quantkern

        quantkern.not_a_name


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("block_size, error, match", [
    (32, ValueError, "does not divide the last dimension 48"),  # would mix neighbouring rows
    (4.5, TypeError, "must be an integer"),
    (0, ValueError, "must be positive"),
    (3, ValueError, "not a supported Hadamard order"),
])
def test_blocked_hadamard_checks_the_block_size_on_every_backend(backend, block_size, error, match):
    if "hadamard" not in backends.status(backend).kernels:
        pytest.skip(f"no {backend} hadamard kernel: {backends.status(backend).reason}")
    x = torch.randn(2, 48).half().to(device_for(backend))
    with pytest.raises(error, match=match):
        ops.hadamard(x, backend=backend, block_size=block_size)
    with pytest.raises(error, match=match):
        ops.hadamard_quantize(x, 4, backend=backend, block_size=block_size)
    y = ops.hadamard(x, backend=backend, block_size=16)  # a block that divides: each row on its own
    torch.testing.assert_close(y[1], ops.hadamard(x[1:], backend=backend, block_size=16)[0], rtol=0, atol=0)


def test_weight_only_linear_refuses_a_weight_prepared_for_quantized_activations():
    """A weight from prepare_int_weight belongs to a layer that quantizes its activations: running it as W4A16
    would give other numbers without a word (measured: up to 2.8 apart from w4a4_linear)."""
    weight = reference.quantize_weight(torch.randn(16, 64), 4, -1)
    with pytest.raises(ValueError, match="prepared for 4-bit activations"):
        ops.weight_only_linear(torch.randn(2, 64), ops.prepare_int_weight(weight, 4))
    assert ops.weight_only_linear(torch.randn(2, 64), ops.prepare_weight_only(weight, torch.float32)).shape == (2, 16)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", ["hadamard", "hadamard_quantize"])
def test_a_row_length_without_a_hadamard_matrix_is_refused_naming_the_op(name, backend):
    # 4864 = 19 x 256 (Qwen2.5-0.5B's intermediate size): the Triton hadamard_quantize failed with
    # "TypeError: cannot unpack non-iterable NoneType object" (100 here: the interpreter is slow).
    if name not in backends.status(backend).kernels:
        pytest.skip(f"no {backend} {name} kernel: {backends.status(backend).reason}")
    for features in (100, 4864):
        with pytest.raises(ValueError, match=rf"^{name}: no Hadamard matrix of order {features} .*block_size="):
            getattr(ops, name)(torch.zeros(2, features).half(), backend=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", [ops.weight_only_linear, ops.w4a4_linear, ops.w4a8_linear])
def test_linear_ops_check_the_bias_the_weight_and_the_devices(op, backend):
    device = device_for(backend)
    qw = reference.quantize_weight(torch.randn(16, 64, device=device), 4, 32)
    x = torch.randn(2, 64, device=device).half()
    for bias, error, match in ((torch.zeros(16, dtype=torch.int32, device=device), TypeError,
                                "bias must be a floating-point"),
                               ([0.0] * 16, TypeError, "bias must be a floating-point torch.Tensor or None, got list"),
                               (torch.zeros(16, device="meta"), ValueError, f"bias is on meta but x on {x.device}")):
        with pytest.raises(error, match=match):  # were: accepted (int), AttributeError, a torch device error
            op(x, qw, bias, backend=backend)
    with pytest.raises(TypeError, match="weight must be a QuantizedWeight or PreparedWeight, got Tensor"):
        op(x, torch.randn(16, 64), backend=backend)  # was: AttributeError: 'Tensor' object has no attribute 'bits'
    with pytest.raises(ValueError, match=f"x is on meta but the weight on {x.device}"):
        op(x.to("meta"), qw, backend=backend)  # Triton's int ops returned a tensor; the reference: a torch error
    bias = torch.zeros(16, dtype=torch.bfloat16, device=device)
    assert op(x, qw, bias, backend=backend).shape == (2, 16)


def test_quantize_kv_never_runs_the_reference_for_another_backend(monkeypatch):
    # It ran reference.quantize_kv for any choice but "triton": a CUDA kernel registered for it later would have
    # been bypassed by plain PyTorch on the GPU without a word.
    monkeypatch.setattr(ops, "select", lambda op, device, backend=None: "cuda")
    with pytest.raises(MissingKernelError, match="quantize_kv: no cuda kernel"):
        ops.quantize_kv(torch.randn(2, 4, 64).half(), 4)
