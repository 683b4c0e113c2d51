"""``ops.permute_columns``: the input gather of act-order layers (csrc/permute.cu, triton_kernels/permute.py, and
the reference's index_select).

The Triton kernel runs on the GPU if there is one, else under the interpreter. GPU tests compare the CUDA op with
``index_select`` bit for bit over the models' widths, and check that a W4A16 layer launched right after it under a
CUDA graph (as its programmatic dependent) reads the gathered input, not a stale one.
"""

import pytest
import torch

from quantkern import backends, ops, reference
from quantkern.layout_cuda import prepare_w4a16, w4a16_linear
from quantkern.nn import QuantLinear
from tests.test_w4a16_cuda import check_graph_replays

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
cuda_ext = backends.status("cuda")
has_kernel = "permute_columns" in cuda_ext.kernels
needs_kernel = pytest.mark.skipif(not has_kernel, reason=f"CUDA extension or its permute_columns missing: "
                                                         f"{cuda_ext.reason}")

# SmolLM2's 576 / 1536, Qwen's 896 / 4864, Llama's 4096 / 14336, and widths that are not a multiple of the block.
WIDTHS = [576, 896, 1536, 4096, 4864, 14336, 5, 129]


def test_reference_gathers_the_last_dimension():
    x = torch.tensor([[10.0, 11.0, 12.0, 13.0], [20.0, 21.0, 22.0, 23.0]])
    y = ops.permute_columns(x, torch.tensor([2, 0, 3, 1]))
    assert torch.equal(y, torch.tensor([[12.0, 10.0, 13.0, 11.0], [22.0, 20.0, 23.0, 21.0]]))
    lead = ops.permute_columns(x.reshape(2, 1, 4), torch.tensor([3, 2, 1, 0]))  # leading dimensions kept
    assert lead.shape == (2, 1, 4) and torch.equal(lead[1, 0], torch.tensor([23.0, 22.0, 21.0, 20.0]))
    assert ops.permute_columns(torch.empty(0, 4), torch.arange(4)).shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(1, 576), (3, 1536), (5, 896), (2, 4864), (4, 4096), (1, 14336), (7, 129),
                                   (2, 3, 64), (0, 64)])
def test_triton_equals_index_select(shape, dtype):
    # On a GPU if there is one, else under TRITON_INTERPRET=1 (tests/conftest.py).
    torch.manual_seed(shape[-1])
    x = torch.randn(*shape, device=DEVICE).to(dtype)
    permutation = torch.randperm(shape[-1], device=DEVICE)
    got = ops.permute_columns(x, permutation, backend="triton")
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, x.index_select(-1, permutation))


def test_errors():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="int64 of shape \\(8,\\)"):
        ops.permute_columns(x, torch.randperm(8).int())
    with pytest.raises(ValueError, match="int64 of shape \\(8,\\)"):
        ops.permute_columns(x, torch.randperm(7))
    with pytest.raises(TypeError, match="permutation must be a torch.Tensor"):
        ops.permute_columns(x, list(range(8)))
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.permute_columns(x.long(), torch.randperm(8))
    with pytest.raises(ValueError, match="no features"):
        ops.permute_columns(torch.empty(2, 0), torch.randperm(0))
    with pytest.raises(ops.MissingKernelError, match="permute_columns: backend 'cuda' cannot run"):
        ops.permute_columns(x, torch.randperm(8), backend="cuda")


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens", [1, 4, 7, 16, 17, 18, 19, 64, 2048])  # (more than 16: rows staged)
@pytest.mark.parametrize("features", WIDTHS)
def test_cuda_equals_index_select(features, tokens, dtype):
    torch.manual_seed(features + tokens)
    x = torch.randn(tokens, features, device="cuda").to(dtype)
    permutation = torch.randperm(features, device="cuda")
    got = torch.ops.quantkern.permute_columns(x, permutation)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, x.index_select(-1, permutation))


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("features, dtype", [(12288, torch.float32), (24576, torch.float32), (49152, torch.float16),
                                             (8, torch.float16), (21, torch.bfloat16)])
def test_cuda_many_rows_every_staging(features, dtype):
    # More than 16 rows: 4, 2 or 1 staged rows a block, as many as 96 KiB hold (fp32 12288: rows of 48 KiB, two;
    # fp32 24576 and fp16 49152: 96 KiB, one), copied in 16-byte vectors or not (21 bf16 entries: rows not 16-byte
    # aligned); wider rows go to index_select (fp32 32768, below).
    torch.manual_seed(features)
    for tokens in (17, 37):
        x = torch.randn(tokens, features, device="cuda").to(dtype)
        permutation = torch.randperm(features, device="cuda")
        assert torch.equal(torch.ops.quantkern.permute_columns(x, permutation), x.index_select(-1, permutation))
    x = torch.randn(20, 32768, device="cuda")
    permutation = torch.randperm(32768, device="cuda")
    assert torch.equal(torch.ops.quantkern.permute_columns(x, permutation), x.index_select(-1, permutation))


@pytest.mark.gpu
@needs_kernel
def test_cuda_op_layouts_and_checks():
    x = torch.randn(2, 3, 64, device="cuda", dtype=torch.float16)
    permutation = torch.randperm(64, device="cuda")
    assert torch.equal(ops.permute_columns(x, permutation), x.index_select(-1, permutation))  # 3-D input
    strided = torch.randn(64, 8, device="cuda", dtype=torch.float16).t()  # not contiguous
    assert torch.equal(ops.permute_columns(strided, permutation), strided.index_select(-1, permutation))
    empty = torch.empty(0, 64, device="cuda", dtype=torch.float16)
    assert ops.permute_columns(empty, permutation).shape == (0, 64)
    with pytest.raises(ValueError, match="but permutation on cpu"):
        ops.permute_columns(x, permutation.cpu())
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.quantkern.permute_columns(strided, permutation)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        torch.ops.quantkern.permute_columns(x.reshape(6, 64).to(torch.float64), permutation)


@pytest.mark.gpu
@needs_kernel
@pytest.mark.parametrize("k, m", [(4096, 1), (4096, 16), (576, 4), (1536, 16)])
def test_gemm_after_the_gather_reads_its_output(k, m):
    # Under capture the small-M W4A16 GEMM right after the gather is its programmatic dependent: it starts early
    # and must still read the gathered input of this replay (a new one every replay).
    torch.manual_seed(0)
    w = torch.randn(k, k, device="cuda") / k ** 0.5
    prepared = prepare_w4a16(reference.quantize_weight(w, 4, 64, symmetric=True), torch.float16)
    permutation = torch.randperm(k, device="cuda")

    def chain(t):  # gather, GEMM, four times: each gather reads the GEMM before it, each GEMM its gather
        outs = []
        for _ in range(4):
            t = w4a16_linear(ops.permute_columns(t, permutation), prepared)
            outs.append(t)
        return outs

    def one_by_one(t):
        outs = []
        for _ in range(4):
            t = w4a16_linear(t.index_select(-1, permutation), prepared)
            torch.cuda.synchronize()
            outs.append(t.clone())
        return outs

    check_graph_replays(chain, one_by_one, (m, k), torch.float16)


@pytest.mark.gpu
@needs_kernel
def test_act_order_layer_runs_the_kernel_and_compiles():
    torch.manual_seed(0)
    k, n = 896, 4864
    qw = reference.quantize_weight(torch.randn(n, k) / k ** 0.5, 4, 128, symmetric=False, scale_dtype=torch.float16)
    permutation = torch.randperm(k)
    layer = QuantLinear.from_quantized(qw, input_permutation=permutation)
    x = torch.randn(3, k, dtype=torch.float16)
    want = layer(x.float()).float()  # the CPU reference path
    layer = layer.cuda()
    x = x.cuda()
    got = layer(x).float().cpu()
    assert (got - want).abs().max() <= 2e-3 * want.abs().max() + 1e-3
    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x), layer(x))
