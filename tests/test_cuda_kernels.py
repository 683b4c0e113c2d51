"""The CUDA extension's kernels against the reference, on the GPU (marked ``gpu``), plus the
checks that need only the built extension (its ops exist and refuse CPU tensors cleanly), and, on the CPU, the
fake implementations of quantkern/_fake.py against the op schemas of csrc/bindings.cpp."""

import pathlib

import pytest
import torch

from quantkern import backends, ops, reference

cuda_ext = backends.status("cuda")
needs_extension = pytest.mark.skipif(not cuda_ext.available, reason=f"CUDA extension missing: {cuda_ext.reason}")

# On sm_90 rows of more than 1024 16-byte vectors split over a thread-block cluster when the rows are few
# (csrc/activation_quant.cu): 14336 (7 blocks), 32768 and 65536 in fp16 / bf16 (8 blocks, 2 and 4 vectors a
# thread), 8192 in fp32 (16 rows x 8 blocks); one block a row for 40 x 14336 (280 blocks), fp32 65536 (too long)
# and the shorter rows.
TOKEN_SHAPES = [(1, 576), (3, 1536), (5, 896), (2, 4864), (4, 4096), (2, 14336), (3, 32768), (1, 65536),
                (16, 8192), (40, 14336), (7, 2), (3, 130), (5, 1000), (2, 1030), (0, 64), (257, 576)]


@needs_extension
def test_extension_reports_its_build():
    from quantkern import _C

    info = _C.build_info()
    assert "quantize_per_token" in info["kernels"]
    assert info["archs"] and info["cuda_version"] and info["torch_version"]


@needs_extension
def test_extension_op_refuses_cpu_tensors_cleanly():
    with pytest.raises(NotImplementedError):
        torch.ops.quantkern.quantize_per_token(torch.randn(2, 8), 8, 1.0)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,features", TOKEN_SHAPES)
def test_quantize_per_token_is_bit_exact(bits, dtype, tokens, features):
    x = (torch.randn(tokens, features, device="cuda") * 5).to(dtype)
    if tokens > 1:
        x[1] = 0
    clip = 0.9 if features % 3 else 1.0
    q, scales = ops.quantize_per_token(x, bits, clip, backend="cuda")
    q_ref, s_ref = reference.quantize_per_token(x, bits, clip)
    assert torch.equal(scales, s_ref)
    assert torch.equal(q, q_ref)
    if bits == 4:  # the same codes one per byte (the sm_90 W4A4 path)
        q8, scales8 = ops.quantize_per_token(x, bits, clip, backend="cuda", packed=False)
        assert q8.dtype == torch.int8 and torch.equal(q8, reference.unpack_int4_signed(q_ref))
        assert torch.equal(scales8, s_ref)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows,features", [(4, 16392), (4, 14336), (70, 14336), (4, 8192), (4, 8000), (9, 1024)])
def test_quantize_per_token_special_values_are_bit_exact(bits, rows, features):
    """NaN and infinite entries and an all-zero row, in the cluster path (few rows, on sm_90), one block a row, and
    rows that one round of loads covers (8192 and fewer: kept in registers; 1024: a warp a row)."""
    x = torch.randn(rows, features, device="cuda", dtype=torch.bfloat16)
    x[0, features - 1] = float("nan")
    x[1, 7] = float("inf")
    x[2] = 0
    q, scales = ops.quantize_per_token(x, bits, 0.8, backend="cuda")
    q_ref, s_ref = reference.quantize_per_token(x, bits, 0.8)
    torch.testing.assert_close(scales, s_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(q, q_ref)


@pytest.mark.gpu
@needs_extension
def test_quantize_per_token_misaligned_input_takes_the_scalar_path():
    base = torch.randn(4 * 577 + 1, device="cuda", dtype=torch.float16)
    x = base[1:].view(4, 577)[:, :576]  # rows start at odd element offsets
    q, s = ops.quantize_per_token(x, 4, backend="cuda")
    q_ref, s_ref = reference.quantize_per_token(x.contiguous(), 4)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    q8, _ = ops.quantize_per_token(x, 4, backend="cuda", packed=False)
    assert torch.equal(q8, reference.unpack_int4_signed(q_ref))
    raw = torch.ops.quantkern.quantize_per_token(base[1:1 + 3 * 576].view(3, 576), 8, 1.0)
    assert torch.equal(raw[0], reference.quantize_per_token(base[1:1 + 3 * 576].view(3, 576), 8)[0])


@pytest.mark.gpu
@needs_extension
def test_quantize_per_token_is_deterministic():
    # (Which stream it runs on: tests/test_streams_gpu.py.)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.bfloat16)
    first = ops.quantize_per_token(x, 4)
    second = ops.quantize_per_token(x, 4)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


@pytest.mark.gpu
@needs_extension
def test_quantize_per_token_under_cuda_graph_and_compile():
    x = torch.randn(16, 4096, device="cuda", dtype=torch.float16)
    expected = reference.quantize_per_token(x, 8)

    compiled = torch.compile(lambda t: ops.quantize_per_token(t, 8), fullgraph=True)
    q, s = compiled(x)
    assert torch.equal(q, expected[0]) and torch.equal(s, expected[1])

    static_x = x.clone()
    ops.quantize_per_token(static_x, 8)  # warm up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_q, static_s = ops.quantize_per_token(static_x, 8)
    new_x = torch.randn_like(x)
    static_x.copy_(new_x)
    graph.replay()
    new_expected = reference.quantize_per_token(new_x, 8)
    assert torch.equal(static_q, new_expected[0]) and torch.equal(static_s, new_expected[1])


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("call,match", [
    (lambda x: torch.ops.quantkern.quantize_per_token(x, 3, 1.0), "bits"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x[:, :7].contiguous(), 4, 1.0), "even"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x, 8, 0.0), "clip_ratio"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x.double(), 8, 1.0), "float16, bfloat16 or float32"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x[None], 8, 1.0), "2-D"),
    (lambda x: torch.ops.quantkern.quantize_per_token(x.t(), 8, 1.0), "contiguous"),
])
def test_extension_op_checks_its_input(call, match):
    x = torch.randn(8, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match=match):
        call(x)


# ----------------------------------------------------------------------------------------------
# The fake (meta) implementations (quantkern/_fake.py) against the ops' schemas and outputs. CPU: the schemas are
# read from csrc/bindings.cpp and defined under a scratch namespace, so no extension is needed; the expected
# outputs are those of the C++ ops (the at::empty calls of their host functions).
# ----------------------------------------------------------------------------------------------

BINDINGS = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "bindings.cpp"


def extension_schemas():
    """name -> schema of every m.def in csrc/bindings.cpp's TORCH_LIBRARY block (string literals joined)."""
    import re

    text = BINDINGS.read_text()
    block = text[text.index("TORCH_LIBRARY(quantkern, m)"):]
    block = block[:block.index("\n}\n")]
    schemas = {}
    for call in re.findall(r'm\.def\(((?:\s*"[^"]*")+)\s*\)', block):
        schema = "".join(re.findall(r'"([^"]*)"', call))
        schemas[schema[:schema.index("(")]] = schema
    return schemas


def test_every_extension_op_has_a_fake_taking_its_schema_arguments():
    import inspect

    from quantkern._fake import FAKES

    schemas = extension_schemas()
    assert len(schemas) >= 7 and sorted(schemas) == sorted(FAKES)
    for name, schema in schemas.items():
        arguments = torch._C.parse_schema(f"quantkern::{schema}").arguments
        params = list(inspect.signature(FAKES[name]).parameters.values())
        assert [p.name for p in params] == [a.name for a in arguments], name
        for p, a in zip(params, arguments):
            if a.has_default_value():
                assert p.default == a.default_value, (name, a.name)


@pytest.fixture(scope="module")
def fake_ops():
    """The extension's schemas under a scratch namespace, with quantkern._fake's fakes registered."""
    from quantkern._fake import FAKES

    namespace = "quantkern_fake_check"
    lib = torch.library.Library(namespace, "DEF")
    for name, schema in extension_schemas().items():
        lib.define(schema)
        torch.library.register_fake(f"{namespace}::{name}", FAKES[name], lib=lib)
    yield getattr(torch.ops, namespace)
    lib._destroy()


def _column_view(n):
    # contiguous, but with the strides (1, 1) of a transposed column (the op's output is [n, 1]-strided)
    return torch.empty(n, 1, device="cuda", dtype=torch.float16).t()


I8, U8, I32, F32 = torch.int8, torch.uint8, torch.int32, torch.float32
H, B = torch.float16, torch.bfloat16
Q_PER_TOKEN = [  # (args: (shape, dtype) for a tensor, kwargs, expected (shape, dtype) of each output)
    ((((5, 64), H), 8, 1.0), {}, [((5, 64), I8), ((5,), F32)]),
    ((((3, 130), B), 4, 0.9), {}, [((3, 65), U8), ((3,), F32)]),
    ((((3, 130), F32), 4, 1.0), {"packed": False}, [((3, 130), I8), ((3,), F32)]),
    ((((0, 64), H), 4, 1.0), {"packed": True}, [((0, 32), U8), ((0,), F32)]),
]
FAKE_CASES = [("quantize_per_token", *case) for case in Q_PER_TOKEN] + [
    ("hadamard_quantize", args, {"block_size": 0, **kwargs}, expected) for args, kwargs, expected in Q_PER_TOKEN
] + [
    ("hadamard_quantize", (((4, 256), B), 4, 1.0), {"block_size": 16, "packed": False},
     [((4, 256), I8), ((4,), F32)]),
    # w4a16_gemm: y [M, N] in x's dtype, N = scales.size(1)
    ("w4a16_gemm", (((7, 256), H), ((6, 512), I32), ((2, 96), H), None, None, ((4096,), I32), 128), {},
     [((7, 96), H)]),
    ("w4a16_gemm", (((7, 256), B), ((6, 512), I32), ((8, 96), B), ((8, 96), B), ((96,), B), ((4096,), I32), 32),
     {"split_k": 2, "tile_m": 16, "scales_fit_fp16": True}, [((7, 96), B)]),
    # int_gemm: y [M, N] in out_dtype, N = w_scale.size(1); int_gemm_acc: int32 [M, n]
    ("int_gemm", (((5, 256), I8), ((5,), F32), ((2, 2, 64, 128), I8), ((1, 72), F32), None, 8, 8, 256, B), {},
     [((5, 72), B)]),
    ("int_gemm", (((5, 128), U8), ((5,), F32), ((2, 2, 64, 64), U8), ((2, 72), F32), ((72,), F32), 4, 4, 128, H),
     {"split_k": 3, "config": 1}, [((5, 72), H)]),
    ("int_gemm_acc", (((5, 256), I8), ((2, 2, 64, 64), U8), 72, 8, 4), {}, [((5, 72), I32)]),
    ("permute_columns", (((3, 256), B), ((256,), torch.int64)), {}, [((3, 256), B)]),
    ("hadamard", (((2, 3, 128), F32),), {}, [((2, 3, 128), F32)]),
    ("hadamard", (((4, 256), H),), {"block_size": 16}, [((4, 256), H)]),
    ("hadamard", (_column_view,), {}, [((1, 64), H)]),
]


@pytest.mark.parametrize("name,args,kwargs,expected", FAKE_CASES)
def test_fake_gives_the_real_ops_outputs(fake_ops, name, args, kwargs, expected):
    from torch._subclasses.fake_tensor import FakeTensorMode

    def make(arg):
        if arg is _column_view:
            return _column_view(64)
        if isinstance(arg, tuple) and len(arg) == 2 and isinstance(arg[0], tuple):
            return torch.empty(arg[0], dtype=arg[1], device="cuda")
        return arg

    with FakeTensorMode():
        outputs = getattr(fake_ops, name)(*[make(a) for a in args], **kwargs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        assert len(outputs) == len(expected)
        for out, (shape, dtype) in zip(outputs, expected):
            assert (tuple(out.shape), out.dtype, out.device.type) == (shape, dtype, "cuda")
            # every op returns fresh contiguous tensors (at::empty / at::zeros of the sizes)
            assert out.stride() == torch.empty(shape, device="meta").stride()


def test_prepare_int_weight_refuses_cuda_w4a4_groups_the_native_int4_gemm_cannot_run(monkeypatch):
    # On sm_80-89 W4A4 runs on int4 tensor cores, 64 k per step: quantkern::int_gemm refuses groups of 32 there.
    from quantkern import layout_int
    from quantkern.backends import MissingKernelError

    monkeypatch.setattr(layout_int, "has_int4_tensor_cores", lambda device: True)
    with pytest.raises(MissingKernelError, match="multiple of 64"):
        layout_int.prepare_int_weight(reference.quantize_weight(torch.randn(8, 256), 4, 32), 4, "cuda")
    for group in (64, -1):  # served; and W4A8 / Triton take groups of 32
        assert layout_int.prepare_int_weight(reference.quantize_weight(torch.randn(8, 256), 4, group), 4,
                                             "cuda")["gemm_act_bits"] == 4
    layout_int.prepare_int_weight(reference.quantize_weight(torch.randn(8, 256), 4, 32), 8, "cuda")
    layout_int.prepare_int_weight(reference.quantize_weight(torch.randn(8, 256), 4, 32), 4, "triton")


def test_weight_only_linear_passes_the_kernel_a_contiguous_bias(monkeypatch):
    # quantkern::w4a16_gemm refuses a strided bias: ops.weight_only_linear, which hands the caller's bias to every
    # backend, makes it contiguous.
    import types

    from quantkern import layout_cuda, ops

    seen = {}

    def op(x, qweight, scales, zeros, bias, locks, group_size, split_k, tile_m, scales_fit_fp16):
        seen["bias"] = bias
        return x.new_empty((x.shape[0], scales.shape[1]))

    monkeypatch.setattr(torch.ops, "quantkern", types.SimpleNamespace(w4a16_gemm=op), raising=False)
    qw = reference.quantize_weight(torch.randn(32, 64), 4, 32)
    prepared = ops.PreparedWeight("cuda", torch.device("cpu"), torch.float16, 4, 32, 64, 32,
                                  tensors=layout_cuda.prepare_w4a16(qw, torch.float16))
    bias = torch.randn(32, 2, dtype=torch.float16)[:, 0]
    ops.weight_only_linear(torch.randn(3, 64, dtype=torch.float16), prepared, bias)
    assert seen["bias"].is_contiguous() and torch.equal(seen["bias"], bias)


def _gpu_fake_check_cases():
    from quantkern.layout_cuda import prepare_w4a16
    from quantkern.layout_int import prepare_int_weight

    q = torch.ops.quantkern
    x = torch.randn(5, 256, device="cuda", dtype=torch.float16)
    perm = torch.randperm(256, device="cuda")
    wide = torch.randn(20, 30000, device="cuda")  # rows too wide to stage: index_select
    cases = [
        (q.quantize_per_token, (x, 8, 1.0)), (q.quantize_per_token, (x, 4, 1.0)),
        (q.quantize_per_token, (x.float(), 4, 0.9, False)), (q.quantize_per_token, (x[:0], 4, 1.0)),
        (q.hadamard, (x,)), (q.hadamard, (x.bfloat16().view(5, 2, 128),)), (q.hadamard, (x, 16)),
        (q.hadamard, (torch.randn(64, 1, device="cuda").t(),)),
        (q.hadamard_quantize, (torch.randn(3, 4096, device="cuda", dtype=torch.bfloat16), 4, 1.0)),  # tensor cores
        (q.hadamard_quantize, (x, 4, 1.0, 0, False)), (q.hadamard_quantize, (x.float(), 8, 1.0, 64)),
        (q.permute_columns, (x, perm)), (q.permute_columns, (x.bfloat16().repeat(5, 1), perm)),
        (q.permute_columns, (wide, torch.randperm(30000, device="cuda"))),
    ]
    for dtype, group, symmetric in [(torch.float16, 128, True), (torch.bfloat16, 32, False)]:
        qw = reference.quantize_weight(torch.randn(96, 256, device="cuda"), 4, group, symmetric=symmetric)
        p = prepare_w4a16(qw, dtype)
        xd, bias = x.to(dtype), torch.randn(96, device="cuda", dtype=dtype)
        for tile_m, split_k, tokens in [(0, 0, 5), (1, 2, 5), (16, 2, 40), (64, 0, 70)]:
            cases.append((q.w4a16_gemm, (xd.repeat(14, 1)[:tokens], p["qweight"], p["scales"], p["zeros"], bias,
                                         p["locks"], p["group_size"], split_k, tile_m, p["scales_fit_fp16"])))
    for bits, act_bits in [(8, 8), (4, 4), (4, 8)]:
        for group in (-1, 128):
            qw = reference.quantize_weight(torch.randn(96, 256, device="cuda"), bits, group)
            p = prepare_int_weight(qw, act_bits, "cuda")
            for m in (0, 5, 200):
                xa = torch.randn(m, 256, device="cuda", dtype=torch.float16)
                qa, sa = ops.quantize_per_token(xa, act_bits, backend="cuda", packed=p["packed_activations"])
                cases.append((q.int_gemm, (qa, sa, p["w"], p["w_scale"], None, p["gemm_act_bits"], bits,
                                           p["group_len"], torch.bfloat16)))
                cases.append((q.int_gemm_acc, (qa, p["w"], 96, p["gemm_act_bits"], bits)))
    return cases


@pytest.mark.gpu
@needs_extension
def test_fakes_match_the_real_ops():
    """Each op's fake (quantkern/_fake.py) against the op itself: shapes, dtypes, devices, strides (opcheck)."""
    for op, args in _gpu_fake_check_cases():
        torch.library.opcheck(op, args, test_utils=("test_faketensor",))


@needs_extension
def test_fakes_are_registered_once_whoever_loads_the_extension():
    import quantkern._fake as fake_module

    fake_module.register_extension_fakes()  # again (quantkern.backends did): a no-op, no "already registered"
    for name in fake_module.FAKES:
        if hasattr(torch.ops.quantkern, name):
            assert torch._library.simple_registry.singleton.find(f"quantkern::{name}").fake_impl.kernel is not None


@pytest.mark.gpu
@needs_extension
def test_int_gemm_checks_its_scales():
    from quantkern.layout_int import prepare_int_weight

    qw = reference.quantize_weight(torch.randn(96, 256, device="cuda"), 8, -1)
    p = prepare_int_weight(qw, 8, "cuda")
    qa, sa = ops.quantize_per_token(torch.randn(5, 256, device="cuda", dtype=torch.float16), 8, backend="cuda")
    odd = torch.empty(97, device="cuda")[1:].view(1, 96).copy_(p["w_scale"])  # contiguous, 4 bytes off
    args = (qa, sa, p["w"], odd, None, 8, 8, 256, torch.float16)
    with pytest.raises(RuntimeError, match="w_scale must be 8-byte aligned"):
        torch.ops.quantkern.int_gemm(*args, 0, 1)  # (the mma.sync kernel reads w_scale as float2)
    with pytest.raises(RuntimeError, match="a_scale must be a CUDA tensor"):
        torch.ops.quantkern.int_gemm(qa, sa.cpu(), p["w"], p["w_scale"], None, 8, 8, 256, torch.float16)
    with pytest.raises(RuntimeError, match="bias must be float32"):
        torch.ops.quantkern.int_gemm(qa, sa, p["w"], p["w_scale"], torch.zeros(96, device="cuda").half(), 8, 8,
                                     256, torch.float16)


@pytest.mark.gpu
@needs_extension
@pytest.mark.parametrize("plan", [
    lambda _C: _C.w4a16_small_m_plan(0, 4096, 4096, 128, True, 132, 232448),  # divided by zero blocks before
    lambda _C: _C.w4a16_small_m_plan(1, 0, 4096, 128, True, 132, 232448),
    lambda _C: _C.w4a16_small_m_plan(1, 4096, 4096, 256, True, 132, 232448),
    lambda _C: _C.int_small_m_plan(0, 4096, 4096, 4),
    lambda _C: _C.int_small_m_plan(1, 4096, 4096, 3),
])
def test_launch_plan_helpers_refuse_what_no_call_has(plan):
    from quantkern import _C

    with pytest.raises(RuntimeError):
        plan(_C)
