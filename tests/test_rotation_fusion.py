"""quantkern.rotation's helpers for rotations fused into weights (QuaRot): per-head blocks and PCA."""

import pytest
import torch

from quantkern.rotation import block_diagonal_hadamard, block_hadamard_transform, pca_rotation, random_hadamard_matrix


def eye(n):
    return torch.eye(n, dtype=torch.float64)


@pytest.mark.parametrize("block, count", [(16, 4), (64, 9), (12, 3)])
def test_block_diagonal_hadamard_is_orthogonal_and_matches_the_block_transform(block, count):
    m = block_diagonal_hadamard(block, count)
    n = block * count
    assert m.shape == (n, n)
    assert torch.allclose(m @ m.T, eye(n), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x @ m.T, block_hadamard_transform(x, block), atol=1e-12)
    # Nothing outside the diagonal blocks.
    assert m[:block, block:].abs().max() == 0


def test_block_diagonal_hadamard_errors():
    with pytest.raises(ValueError, match="no Hadamard"):
        block_diagonal_hadamard(9, 2)
    with pytest.raises(ValueError, match="count"):
        block_diagonal_hadamard(16, 0)


def test_random_hadamard_is_orthogonal_at_smollm_sizes():
    for n in (576, 64):
        q = random_hadamard_matrix(n, seed=1)
        assert torch.allclose(q @ q.T, eye(n), atol=1e-10)
        assert torch.allclose(q.abs(), torch.full_like(q, n ** -0.5))  # every entry +-1/sqrt(n): full mixing


def test_pca_rotation_orders_the_variances_and_is_orthogonal():
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 4.0, 1.0, 2.0, 8.0, 0.1], dtype=torch.float64)
    mixing = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=generator))[0]
    x = torch.randn(4000, 6, dtype=torch.float64, generator=generator) * scales @ mixing
    v = pca_rotation(x.T @ x)
    assert torch.allclose(v.T @ v, eye(6), atol=1e-12)
    variances = (x @ v).pow(2).mean(0)
    assert torch.all(variances[:-1] >= variances[1:])
    # Decorrelated: the rotated second moment is diagonal.
    moment = (x @ v).T @ (x @ v)
    off_diagonal = moment - torch.diag(torch.diagonal(moment))
    assert off_diagonal.abs().max() < 1e-8 * moment.abs().max()


def test_pca_rotation_signs_do_not_depend_on_the_solver():
    a = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = pca_rotation(a.T @ a)
    pivot = v.abs().argmax(dim=0)
    assert torch.all(v[pivot, torch.arange(8)] > 0)
    # Scaling the matrix changes neither the vectors nor their signs.
    assert torch.allclose(pca_rotation(3.0 * a.T @ a), v, atol=1e-10)


def test_pca_rotation_errors():
    with pytest.raises(ValueError, match="square"):
        pca_rotation(torch.ones(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        pca_rotation(torch.full((3, 3), float("nan")))


@pytest.mark.parametrize("n, seed", [(576, 0), (64, 3), (1536, 7)])
def test_random_signs_are_those_of_random_hadamard_matrix(n, seed):
    from quantkern.rotation import hadamard_matrix, hadamard_transform, random_signs

    signs = random_signs(n, seed)
    r = random_hadamard_matrix(n, seed)
    assert torch.equal(r, hadamard_matrix(n) * signs[None, :] / n ** 0.5)
    x = torch.randn(3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(hadamard_transform(x, transpose=True) * signs, x @ r, atol=1e-12)
