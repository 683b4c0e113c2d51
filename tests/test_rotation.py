"""Tests for quantkern.rotation: Hadamard constructions and the reference transform."""

import math

import pytest
import torch

from quantkern.rotation import (
    HADAMARD_BASE_SIZES,
    block_hadamard_transform,
    hadamard_factorization,
    hadamard_matrix,
    hadamard_transform,
    is_hadamard_size,
    largest_hadamard_block,
    random_hadamard_matrix,
)

BASE_ORDERS = (1, 2, 4, 12, 20, 28, 36, 40)

# m * 2**k for every base; dense float64 H @ H.T is cheap up to 1536.
DENSE_CHECK_SIZES = (
    8, 16, 64, 256, 1024,
    24, 48, 96, 384, 1536,
    80, 160, 320,
    56, 112, 224, 896,
    72, 144, 576,
    640,
)
# Larger orders: H @ H.T is computed exactly through the (separately verified)
# fast transform instead of a dense O(n^3) matmul.
LARGE_CHECK_SIZES = (2048, 2304, 2560, 3072, 3584, 4096)

TRANSFORM_SIZES = (1, 2, 4, 12, 20, 28, 36, 40, 64, 80, 576, 896, 1536, 3584, 4096)


def make_generator(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def random_input(*shape, dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.randn(*shape, generator=make_generator(seed), dtype=torch.float64).to(dtype)


def dense_reference(x: torch.Tensor, n: int) -> torch.Tensor:
    """x @ H.T / sqrt(n) with the explicit matrix, in float64."""
    h = hadamard_matrix(n, dtype=torch.float64)
    return x.to(torch.float64) @ h.T / math.sqrt(n)


# ---------------------------------------------------------------------------
# Sizes and factorisation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, expected",
    [
        (1, (1, 0)),
        (2, (1, 1)),
        (64, (1, 6)),
        (4096, (1, 12)),
        (12, (12, 0)),
        (24, (12, 1)),
        (1536, (12, 7)),
        (20, (20, 0)),
        (40, (40, 0)),
        (80, (40, 1)),
        (5120, (40, 7)),
        (28, (28, 0)),
        (896, (28, 5)),
        (3584, (28, 7)),
        (14336, (28, 9)),
        (36, (36, 0)),
        (576, (36, 4)),
        (4864, None),
        (11008, None),
        (3, None),
        (6, None),
        (44, None),
        (0, None),
        (-8, None),
    ],
)
def test_hadamard_factorization(n, expected):
    assert hadamard_factorization(n) == expected
    assert is_hadamard_size(n) == (expected is not None)
    if expected is not None:
        m, k = expected
        assert m in HADAMARD_BASE_SIZES and m * 2**k == n


def test_factorization_rejects_non_integers():
    with pytest.raises(TypeError):
        hadamard_factorization(64.0)
    with pytest.raises(TypeError):
        hadamard_matrix(True)


@pytest.mark.parametrize(
    "n, expected",
    [(4864, 256), (14336, 14336), (11008, 256), (13824, 4608), (108, 36), (19, 1), (1, 1), (120, 40)],
)
def test_largest_hadamard_block(n, expected):
    block = largest_hadamard_block(n)
    assert block == expected
    assert n % block == 0 and is_hadamard_size(block)


def test_largest_hadamard_block_rejects_non_positive():
    with pytest.raises(ValueError):
        largest_hadamard_block(0)


# ---------------------------------------------------------------------------
# Matrices
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", BASE_ORDERS + DENSE_CHECK_SIZES)
def test_hadamard_matrix_is_exact_hadamard(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float64
    assert torch.all(h.abs() == 1)
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", LARGE_CHECK_SIZES)
def test_large_hadamard_matrix_is_exact_hadamard(n):
    h = hadamard_matrix(n)
    assert torch.all(h.abs() == 1)
    # Row i of the transform of row j is (H H^T)[j, i]; integer sums are exact in float64.
    gram = hadamard_transform(h, normalize=False)
    assert torch.equal(gram, n * torch.eye(n, dtype=torch.float64))


def test_paley_matrices_are_not_symmetric_but_sylvester_is():
    # Documented reason why the transform has a `transpose` switch.
    assert not torch.equal(hadamard_matrix(12), hadamard_matrix(12).T)
    assert not torch.equal(hadamard_matrix(20), hadamard_matrix(20).T)
    assert torch.equal(hadamard_matrix(256), hadamard_matrix(256).T)


def test_kronecker_order():
    # H_{m * 2**k} = kron(H_m, H_{2**k}): the small factor acts on the slow index.
    for m, power_of_two in ((12, 8), (28, 64), (36, 16), (40, 4)):
        expected = torch.kron(hadamard_matrix(m), hadamard_matrix(power_of_two))
        assert torch.equal(hadamard_matrix(m * power_of_two), expected)
    assert torch.equal(hadamard_matrix(40), torch.kron(hadamard_matrix(2), hadamard_matrix(20)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
def test_hadamard_matrix_dtype(dtype):
    h = hadamard_matrix(24, dtype=dtype)
    assert h.dtype == dtype
    assert torch.equal(h.to(torch.float64), hadamard_matrix(24))


def test_cached_base_matrices_cannot_be_corrupted():
    for n in (12, 20, 28, 36, 40, 1):
        corrupted = hadamard_matrix(n)
        corrupted.fill_(7.0)
        fresh = hadamard_matrix(n)
        assert torch.all(fresh.abs() == 1)
    x = random_input(3, 12, seed=1)
    assert torch.allclose(hadamard_transform(x), dense_reference(x, 12), atol=1e-12)


@pytest.mark.parametrize("n", [3, 6, 44, 4864, 0, -4])
def test_unsupported_sizes_raise(n):
    with pytest.raises(ValueError, match=f"n={n}"):
        hadamard_matrix(n)


# ---------------------------------------------------------------------------
# Fast transform against the explicit matrix
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", TRANSFORM_SIZES)
def test_transform_matches_dense_matrix(n):
    x = random_input(6, n, seed=n)
    expected = dense_reference(x, n)
    assert torch.allclose(hadamard_transform(x), expected, rtol=0, atol=1e-12)
    # Unnormalised and transposed variants use the same matrix.
    h = hadamard_matrix(n)
    assert torch.allclose(hadamard_transform(x, normalize=False), x @ h.T, rtol=0, atol=1e-10)
    assert torch.allclose(hadamard_transform(x, transpose=True), x @ h / math.sqrt(n), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [64, 576, 896, 1536])
def test_fp32_transform_matches_dense_matrix(n):
    x = random_input(4, n, dtype=torch.float32, seed=n + 1)
    y = hadamard_transform(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.double(), dense_reference(x, n), rtol=0, atol=1e-5)


def test_transform_14336_against_kronecker_structure():
    n, m, power_of_two = 14336, 28, 512  # 28 * 2**9 (Llama-3-8B MLP width)
    h_small, h_sylvester = hadamard_matrix(m), hadamard_matrix(power_of_two)
    x = random_input(3, n, seed=14336)
    y = hadamard_transform(x, normalize=False)

    # Full output through the Kronecker identity
    # kron(A, B) vec_rowmajor(X) = vec_rowmajor(A X B^T), built from small explicit matrices.
    expected = (h_small @ x.view(3, m, power_of_two) @ h_sylvester.T).reshape(3, n)
    assert torch.allclose(y, expected, rtol=0, atol=1e-9)

    # A few explicit rows of H: row i = a * 512 + b is kron(H_28[a], H_512[b]).
    for i in (0, 1, 511, 512, 7777, n - 1):
        a, b = divmod(i, power_of_two)
        row = torch.kron(h_small[a], h_sylvester[b])
        assert torch.allclose(y[:, i], x @ row, rtol=0, atol=1e-9)

    # Transform of unit vectors e_j gives column j of H.
    columns = (0, 3, 600, 9000, n - 1)
    unit_vectors = torch.zeros(len(columns), n, dtype=torch.float64)
    unit_vectors[torch.arange(len(columns)), torch.tensor(columns)] = 1.0
    images = hadamard_transform(unit_vectors, normalize=False)
    for image, j in zip(images, columns):
        c, d = divmod(j, power_of_two)
        assert torch.equal(image, torch.kron(h_small[:, c], h_sylvester[:, d]))

    # Orthogonality of the normalised map at this size.
    normalized = hadamard_transform(x)
    assert torch.allclose(normalized.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(hadamard_transform(normalized, transpose=True), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n", [2, 12, 20, 40, 64, 576, 896, 1536])
def test_norm_preservation_and_inverse(n):
    x = random_input(5, n, seed=3 * n)
    y = hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    # H^T undoes H (the normalised transform is orthogonal).
    assert torch.allclose(hadamard_transform(y, transpose=True), x, rtol=0, atol=1e-12)
    assert torch.allclose(y @ hadamard_matrix(n) / math.sqrt(n), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, atol", [(torch.float16, 4e-3), (torch.bfloat16, 3e-2), (torch.float32, 1e-5)])
@pytest.mark.parametrize("n", [64, 576, 1536])
def test_low_precision_inputs(dtype, atol, n):
    x = random_input(8, n, dtype=dtype, seed=n + 7)
    y = hadamard_transform(x)
    assert y.dtype == dtype and y.shape == x.shape
    # Inputs of unit variance map to outputs of unit variance; error is output rounding.
    expected = dense_reference(x, n)
    assert torch.allclose(y.double(), expected, rtol=0, atol=atol)
    # Result equals the fp32 computation rounded once to the input dtype.
    assert torch.equal(y, hadamard_transform(x.float()).to(dtype))


def test_leading_shapes_and_non_contiguous_input():
    x = random_input(2, 3, 4, 96, seed=11)
    y = hadamard_transform(x)
    assert y.shape == x.shape
    assert torch.allclose(y.reshape(-1, 96), dense_reference(x.reshape(-1, 96), 96), atol=1e-12)

    # Transposed (non-contiguous) storage and a 1-D vector.
    base = random_input(96, 10, seed=12)
    x_t = base.T
    assert not x_t.is_contiguous()
    assert torch.allclose(hadamard_transform(x_t), dense_reference(x_t, 96), atol=1e-12)
    vector = random_input(96, seed=13)
    assert torch.allclose(hadamard_transform(vector), dense_reference(vector[None], 96)[0], atol=1e-12)

    # Empty batch is fine.
    assert hadamard_transform(torch.empty(0, 64)).shape == (0, 64)


def test_input_is_not_modified():
    for dtype in (torch.float32, torch.float64):
        for n in (1, 2, 64, 576):
            x = random_input(4, n, dtype=dtype, seed=n)
            saved = x.clone()
            y = hadamard_transform(x)
            assert torch.equal(x, saved)
            assert y.data_ptr() != x.data_ptr()


def test_transform_errors():
    with pytest.raises(TypeError, match="floating"):
        hadamard_transform(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError):
        hadamard_transform([1.0, 2.0])
    with pytest.raises(ValueError, match="empty"):
        hadamard_transform(torch.empty(4, 0))
    with pytest.raises(ValueError):
        hadamard_transform(torch.tensor(1.0))
    with pytest.raises(ValueError, match="n=4864"):
        hadamard_transform(random_input(2, 4864))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_transform_on_cuda_matches_cpu():
    for n in (64, 896, 14336):
        x = random_input(4, n, dtype=torch.float32, seed=n)
        y = hadamard_transform(x.cuda())
        assert y.is_cuda
        assert torch.allclose(y.cpu(), hadamard_transform(x), rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------
# Block-diagonal fallback
# ---------------------------------------------------------------------------


def test_block_transform_equals_per_block_transforms():
    n, block = 4864, largest_hadamard_block(4864)
    assert block == 256
    x = random_input(5, n, seed=4864)
    y = block_hadamard_transform(x, block)
    expected = torch.cat([hadamard_transform(chunk) for chunk in x.split(block, dim=-1)], dim=-1)
    assert torch.allclose(y, expected, rtol=0, atol=1e-12)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(block_hadamard_transform(y, block, transpose=True), x, rtol=0, atol=1e-12)


def test_block_transform_is_orthogonal_block_diagonal_matrix():
    n, block = 19 * 12, 12
    x = random_input(4, n, seed=5)
    blocks = [hadamard_matrix(block) / math.sqrt(block)] * (n // block)
    block_diagonal = torch.block_diag(*blocks)
    assert torch.allclose(block_diagonal @ block_diagonal.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(block_hadamard_transform(x, block), x @ block_diagonal.T, rtol=0, atol=1e-12)


def test_block_transform_keeps_dtype_and_shape():
    x = random_input(2, 3, 4864, dtype=torch.bfloat16, seed=9)
    y = block_hadamard_transform(x, 256)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape


def test_block_transform_errors():
    x = random_input(2, 4864)
    with pytest.raises(ValueError, match="does not divide"):
        block_hadamard_transform(x, 512)
    with pytest.raises(ValueError, match="not a supported"):
        block_hadamard_transform(x, 19)
    with pytest.raises(ValueError):
        block_hadamard_transform(x, 0)
    with pytest.raises(TypeError):
        block_hadamard_transform(x.to(torch.int64), 256)


# ---------------------------------------------------------------------------
# Randomised Hadamard
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [64, 576, 896])
def test_random_hadamard_matrix_orthogonal_and_deterministic(n):
    q = random_hadamard_matrix(n, seed=123)
    assert q.shape == (n, n) and q.dtype == torch.float64
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_hadamard_matrix(n, seed=123))
    assert not torch.equal(q, random_hadamard_matrix(n, seed=124))

    # Q = H diag(s) / sqrt(n): every column is +-(column of H) / sqrt(n).
    h = hadamard_matrix(n)
    signs = (q * math.sqrt(n) / h)
    assert torch.allclose(signs, signs[0:1].expand_as(signs), rtol=0, atol=1e-12)
    assert torch.allclose(signs[0].abs(), torch.ones(n, dtype=torch.float64), atol=1e-12)
    assert (signs[0] > 0).any() and (signs[0] < 0).any()


def test_random_hadamard_matrix_dtype_and_errors():
    q = random_hadamard_matrix(128, seed=0, dtype=torch.float32)
    assert q.dtype == torch.float32
    assert torch.allclose(q @ q.T, torch.eye(128), atol=1e-5)
    with pytest.raises(ValueError):
        random_hadamard_matrix(4864, seed=0)


def test_transform_supports_autograd():
    # Gradient of sum(x @ Q^T) w.r.t. x is the column sums of Q = H / sqrt(n).
    for n in (64, 896):
        x = random_input(3, n, dtype=torch.float32, seed=n).requires_grad_(True)
        y = hadamard_transform(x)
        assert torch.allclose(y.detach().double(), dense_reference(x.detach(), n), atol=1e-5)
        y.sum().backward()
        expected = (hadamard_matrix(n).sum(dim=0) / math.sqrt(n)).float().expand(3, n)
        assert torch.allclose(x.grad, expected, atol=1e-5)
