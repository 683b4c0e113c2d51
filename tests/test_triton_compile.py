"""Triton kernels compiled ahead of time for sm_89 and sm_90 on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1, the CPU tests) runs a kernel's Python with numpy, which accepts code
the compiler refuses (a kernel reading a plain module-level int ran there and failed to compile) and says
nothing of registers. Compiling to a cubin (Triton's own ptxas) catches such errors, and spills, without a
GPU. Where a GPU is visible the kernels themselves run in the other tests, so this file is skipped there.
Covers triton_kernels/block_rotation.py (also run on the H200) and kv_quant.py (not yet run on a GPU) for
sm_89 and sm_90, and on sm_89 (the wheel's target) the kernels that ran on sm_90 only: W4A16 and the integer GEMM (their
configs), the activation quantizer, the Hadamard kernel and the act-order gather.
"""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch

try:
    import triton
except ImportError:  # (pytest.importorskip would also stop the child process below)
    triton = None
pytestmark = [pytest.mark.skipif(triton is None, reason="triton missing"),
              pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: its kernels run in other tests")]


def compile_for(kernel, signature: dict, constants: dict, capability: int, **options):
    """``triton.compile`` of ``kernel`` for an NVIDIA GPU of ``capability`` (89, 90) with ``options``
    (num_warps, num_stages); returns the compiled kernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {name: ("constexpr" if name in constants else kind) for name, kind in signature.items()}
    constexprs = {(i,): constants[name] for i, name in enumerate(signature) if name in constants}
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", capability, 32), options=options)


def spilled_bytes(compiled) -> int:
    """Local-memory bytes per thread of the cubin (register spills), by Triton's bundled cuobjdump."""
    import triton.backends.nvidia as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True,
                               check=True).stdout
    fields = dict(part.split(":") for line in usage.splitlines() if "REG:" in line for part in line.split())
    return int(fields["LOCAL"])


def resources(compiled) -> list:
    """[spilled bytes, shared-memory bytes per block] of a compiled kernel."""
    return [spilled_bytes(compiled), compiled.metadata.shared]


CAPABILITIES = (89, 90)
# (dtype, launch, bits, block, tile, rows per program): the rotation alone, and the fused op's two launches
BLOCK_ROTATION_CASES = [(dtype, mode, bits, block, tile, bm) for dtype in ("fp16", "bf16", "fp32")
                        for mode, bits in (("rotate", 8), ("absmax", 8), ("codes", 8), ("absmax", 4), ("codes", 4))
                        for block, tile, bm in ((128, 64, 16), (128, 64, 128), (6, 16, 16))]


def compile_block_rotation(capability, dtype, mode, bits, block, tile, bm):
    from quantkern.triton_kernels import block_rotation as kernels

    quant = mode != "rotate"
    out = ("*u8" if bits == 4 else "*i8") if quant else f"*{dtype}"
    signature = {"x_ptr": f"*{dtype}", "r_ptr": "*fp32", "out_ptr": out, "scale_ptr": "*fp32" if quant else out,
                 "absmax_ptr": "*i32" if quant else out, "M": "i32", "K": "i32", "r_block_stride": "i32",
                 "clip_ratio": "fp32", "B": None, "BM": None, "BK": None, "BN": None, "MODE": None, "BITS": None,
                 "IS_BF16": None, "DOT_MODE": None}
    constants = {"B": block, "BM": bm, "BK": tile, "BN": tile, "MODE": getattr(kernels, mode.upper()).value,
                 "BITS": bits, "IS_BF16": dtype == "bf16",
                 "DOT_MODE": (kernels.FP32_DOT if dtype == "fp32" else kernels.SPLIT_DOT).value}
    return compile_for(kernels._block_rotation_kernel, signature, constants, capability,
                       num_warps=4 if bm <= 32 else 8)


# The W4A16 kernel's configs (every autotune candidate, and the untuned one at M = 16 and 64) for sm_89, the
# wheel's target, where the kernel has never run: fp16, group 128, symmetric, with bias.
SM89_SHARED_LIMIT = 99 * 1024  # opt-in shared memory per block on sm_89


def w4a16_configs():
    from quantkern.triton_kernels.w4a16 import CONFIGS

    cases = [(tuner, i) for tuner, configs in CONFIGS.items() for i in range(len(configs))]
    return cases + [("untuned", 16), ("untuned", 64)]


def compile_w4a16(capability, tuner, index, dtype="fp16"):
    from quantkern.triton_kernels.w4a16 import CONFIGS, IN_TILE, _untuned_config, _w4a16_kernel

    config = _untuned_config(index, 128, 32) if tuner == "untuned" else CONFIGS[tuner][index]
    signature = {"x_ptr": f"*{dtype}", "w_ptr": "*i32", "s_ptr": f"*{dtype}", "z_ptr": f"*{dtype}",
                 "b_ptr": f"*{dtype}", "y_ptr": f"*{dtype}", "partial_ptr": "*fp32", "lock_ptr": "*i32",
                 "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32", "stride_partial": "i32",
                 "GROUP_LEN": "i32", "M_BUCKET": "i32"}
    constants = dict(HAS_ZEROS=False, HAS_BIAS=True, SCALE_MODE=IN_TILE, DOT_IN_FP32=False, EVEN_K=True,
                     **{k: v for k, v in config.items() if not k.startswith("num_")})
    signature.update({name: None for name in constants})
    return compile_for(_w4a16_kernel, signature, constants, capability, num_warps=config["num_warps"],
                       num_stages=config["num_stages"])


# The integer GEMM (W8A8 / W4A4 / W4A8, Triton) for sm_89 at the three tile configs its rule picks (M = 16, 64,
# 512), bf16 out, with bias: on the RTX 4090 it is the fallback where the CUDA extension is absent.
INT_GEMM_CASES = [(a_bits, w_bits, m) for a_bits, w_bits in ((8, 8), (4, 4), (8, 4)) for m in (16, 64, 512)]


def compile_int_gemm(capability, a_bits, w_bits, m):
    from quantkern.triton_kernels.int_gemm import _config, _int_gemm_kernel

    config = _config(m, 128)
    signature = {"a_ptr": "*i8" if a_bits == 8 else "*u8", "sx_ptr": "*fp32", "w_ptr": "*i8" if w_bits == 8 else "*u8",
                 "sw_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
                 "GLEN": "i32", "stride_a": "i32", "stride_w": "i32", "stride_y": "i32"}
    constants = dict(A_BITS=a_bits, W_BITS=w_bits, HAS_BIAS=True, OUT_ACC=False,
                     **{k: v for k, v in config.items() if not k.startswith("num_")})
    signature.update({name: None for name in constants})
    return compile_for(_int_gemm_kernel, signature, constants, capability, num_warps=config["num_warps"],
                       num_stages=config["num_stages"])


# The KV-cache quantizer (never run on a GPU) for both archs: head_dim 64 and 128, int4 and int8, fp16 and bf16.
KV_CASES = [(dtype, bits, head_dim) for dtype in ("fp16", "bf16") for bits in (4, 8) for head_dim in (64, 128)]


def compile_kv(capability, dtype, bits, head_dim):
    from quantkern.triton_kernels._host import next_power_of_2
    from quantkern.triton_kernels.kv_quant import ROWS, _quantize_kv_kernel

    signature = {"x_ptr": f"*{dtype}", "codes_ptr": "*u8", "scale_ptr": f"*{dtype}", "offset_ptr": f"*{dtype}",
                 "R": "i32", "D": "i32", "BITS": None, "IS_BF16": None, "ROWS_PER_PROGRAM": None, "BLOCK": None}
    constants = dict(BITS=bits, IS_BF16=dtype == "bf16", ROWS_PER_PROGRAM=ROWS,
                     BLOCK=next_power_of_2(head_dim // 2 if bits == 4 else head_dim))
    return compile_for(_quantize_kv_kernel, signature, constants, capability)


# The activation quantizer (K = 4096) and the Hadamard kernels for sm_89: the full-tile one (ran on sm_90 only),
# whose shared memory decides where the chunked one runs instead (8192 and up on sm_89), and the chunked one.
ACTIVATION_CASES = [(dtype, bits) for dtype in ("fp16", "bf16", "fp32") for bits in (4, 8)]
HADAMARD_CASES = [(kernel, dtype, n, quant, bits)
                  for kernel, dtypes, sizes in (("full", ("fp16",), (576, 4096, 8192, 14336)),  # fp32 tiles: any dtype
                                                ("chunked", ("fp16", "bf16", "fp32"), (8192, 14336, 16384)))
                  for dtype in dtypes for n in sizes for quant, bits in ((False, 8), (True, 8), (True, 4))]


def compile_activation_quant(capability, dtype, bits, k=4096):
    from quantkern.triton_kernels._host import next_power_of_2
    from quantkern.triton_kernels.activation_quant import MAX_BLOCK, _quantize_per_token_kernel

    block = min(next_power_of_2(k // 2 if bits == 4 else k), MAX_BLOCK)
    signature = {"x_ptr": f"*{dtype}", "q_ptr": "*u8" if bits == 4 else "*i8", "scale_ptr": "*fp32", "K": "i32",
                 "stride_x_row": "i32", "stride_q_row": "i32", "clip_ratio": "fp32", "BITS": None, "BLOCK": None}
    return compile_for(_quantize_per_token_kernel, signature, dict(BITS=bits, BLOCK=block), capability,
                       num_warps=8 if block >= 1024 else 4)


def compile_hadamard(capability, kernel, dtype, n, quant, bits):
    from quantkern.triton_kernels.hadamard import _chunk_tiles, _hadamard_chunked_kernel, _hadamard_kernel, _split

    r, c, rp, cp = _split(n)
    out = ("*u8" if bits == 4 else "*i8") if quant else f"*{dtype}"
    signature = {"x_ptr": f"*{dtype}", "hr_ptr": "*fp32", "hc_ptr": "*fp32", "out_ptr": out,
                 "scale_ptr": "*fp32" if quant else out, "norm": "fp32", "clip_ratio": "fp32", "R": None, "C": None,
                 "RP": None, "CP": None}
    constants = dict(R=r, C=c, RP=rp, CP=cp)
    if kernel == "chunked":
        signature.update(BK=None, BN=None)
        constants.update(zip(("BK", "BN"), _chunk_tiles(n)))
    signature.update(QUANT=None, BITS=None, IS_BF16=None)
    constants.update(QUANT=quant, BITS=bits, IS_BF16=dtype == "bf16")
    if kernel == "chunked":
        signature["DOT_IN_FP32"] = None
        constants["DOT_IN_FP32"] = False
    return compile_for(_hadamard_chunked_kernel if kernel == "chunked" else _hadamard_kernel, signature, constants,
                       capability, num_warps=8 if n >= 4096 else 4)


# The act-order gather (ran on the H100) for sm_89: every dtype it copies.
PERMUTE_CASES = ["fp16", "bf16", "fp32"]


def compile_permute(capability, dtype):
    from quantkern.triton_kernels.permute import BLOCK, ROWS, _permute_columns_kernel

    signature = {"x_ptr": f"*{dtype}", "permutation_ptr": "*i64", "y_ptr": f"*{dtype}", "M": "i32", "K": "i32",
                 "ROWS_PER_PROGRAM": None, "BLOCK_COLUMNS": None}
    return compile_for(_permute_columns_kernel, signature, dict(ROWS_PER_PROGRAM=ROWS, BLOCK_COLUMNS=BLOCK),
                       capability)


def compile_all() -> dict:
    """{case id: spilled bytes (block rotation) or (spilled bytes, shared bytes) (W4A16), or the compiler's
    error}; run in a process without TRITON_INTERPRET."""
    results = {}
    jobs = [(repr((capability,) + case), lambda c=capability, k=case: spilled_bytes(compile_block_rotation(c, *k)))
            for capability in CAPABILITIES for case in BLOCK_ROTATION_CASES]
    jobs += [(repr(("w4a16", 89) + case), lambda k=case: resources(compile_w4a16(89, *k))) for case in w4a16_configs()]
    jobs += [(repr(("int_gemm", 89) + case), lambda k=case: resources(compile_int_gemm(89, *k)))
             for case in INT_GEMM_CASES]
    jobs += [(repr(("kv", capability) + case), lambda c=capability, k=case: spilled_bytes(compile_kv(c, *k)))
             for capability in CAPABILITIES for case in KV_CASES]
    jobs += [(repr(("activation", 89) + case), lambda k=case: spilled_bytes(compile_activation_quant(89, *k)))
             for case in ACTIVATION_CASES]
    jobs += [(repr(("hadamard", 89) + case), lambda k=case: resources(compile_hadamard(89, *k)))
             for case in HADAMARD_CASES]
    jobs += [(repr(("permute", 89, case)), lambda k=case: spilled_bytes(compile_permute(89, k)))
             for case in PERMUTE_CASES]
    for key, job in jobs:
        try:
            results[key] = job()
        except Exception as error:  # noqa: BLE001  (reported by the test of that case)
            results[key] = f"{type(error).__name__}: {error}"
    return results


@pytest.fixture(scope="module")
def compiled():
    # The tests' conftest sets TRITON_INTERPRET=1, under which @triton.jit gives interpreted functions that
    # cannot be compiled: compile in a child process without it (one process for every case).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("case", BLOCK_ROTATION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_block_rotation_kernel_compiles_without_spills(compiled, capability, case):
    result = compiled[repr((capability,) + case)]
    assert result == 0, f"sm_{capability} {case}: {result if isinstance(result, str) else f'{result} bytes spilled'}"


@pytest.mark.parametrize("case", w4a16_configs() if triton is not None else [], ids=lambda c: f"{c[0]}-{c[1]}")
def test_w4a16_configs_compile_for_sm89_within_its_shared_memory(compiled, case):
    """Every W4A16 config compiles for sm_89 without spills and within its 99 KB of shared memory per block
    (the autotuner would skip a config above it there; the untuned one would fail to launch)."""
    result = compiled[repr(("w4a16", 89) + case)]
    assert not isinstance(result, str), result
    spilled, shared = result
    assert spilled == 0 and shared <= SM89_SHARED_LIMIT, f"{case}: {spilled} B spilled, {shared} B shared"


@pytest.mark.parametrize("case", INT_GEMM_CASES, ids=lambda c: f"a{c[0]}w{c[1]}-m{c[2]}")
def test_int_gemm_configs_compile_for_sm89_within_its_shared_memory(compiled, case):
    result = compiled[repr(("int_gemm", 89) + case)]
    assert not isinstance(result, str), result
    spilled, shared = result
    assert spilled == 0 and shared <= SM89_SHARED_LIMIT, f"{case}: {spilled} B spilled, {shared} B shared"


@pytest.mark.parametrize("capability", CAPABILITIES)
@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kv_quantizer_compiles_without_spills(compiled, capability, case):
    result = compiled[repr(("kv", capability) + case)]
    assert result == 0, f"sm_{capability} {case}: {result if isinstance(result, str) else f'{result} bytes spilled'}"


@pytest.mark.parametrize("case", ACTIVATION_CASES, ids=lambda c: "-".join(map(str, c)))
def test_activation_quantizer_compiles_for_sm89_without_spills(compiled, case):
    result = compiled[repr(("activation", 89) + case)]
    assert result == 0, f"{case}: {result if isinstance(result, str) else f'{result} bytes spilled'}"


@pytest.mark.parametrize("case", PERMUTE_CASES)
def test_permute_kernel_compiles_for_sm89_without_spills(compiled, case):
    result = compiled[repr(("permute", 89, case))]
    assert result == 0, f"{case}: {result if isinstance(result, str) else f'{result} bytes spilled'}"


@pytest.mark.parametrize("case", HADAMARD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_hadamard_kernels_compile_for_sm89(compiled, case):
    """The full-tile kernel's shared memory is what ``full_tile_shared_bytes`` says (the rule that sends rows to
    the chunked kernel where it does not fit); the chunked kernel fits sm_89 at every size."""
    from quantkern.triton_kernels.hadamard import full_tile_shared_bytes

    result = compiled[repr(("hadamard", 89) + case)]
    assert not isinstance(result, str), result
    spilled, shared = result
    kernel, n = case[0], case[2]
    if kernel == "full":
        assert shared == full_tile_shared_bytes(n)
    else:
        assert shared <= SM89_SHARED_LIMIT and spilled == 0, f"{case}: {spilled} B spilled, {shared} B shared"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
