"""Hadamard matrices and a reference (plain PyTorch) Hadamard transform.

Rotating activations and weights by an orthogonal Hadamard matrix spreads
outliers over all channels before low-bit quantisation (QuaRot, SpinQuant,
QuIP#).  This module is the readable CPU/GPU reference that the fused kernels
are tested against.

Supported orders
----------------
``n = m * 2**k`` with ``m`` in ``(1, 12, 20, 28, 36, 40)`` and ``k >= 0``:

* ``2**k``    Sylvester: ``H_1 = [1]``, ``H_2p = [[H_p, H_p], [H_p, -H_p]]``
  (symmetric; equals the k-fold Kronecker power of ``[[1, 1], [1, -1]]``).
* ``12, 20``  Paley's first construction, ``q = 11, 19`` (primes, q = 3 mod 4):
  ``H = I + S`` with ``S = [[0, 1^T], [-1, Q]]`` and ``Q`` the Jacobsthal
  matrix ``Q[i, j] = legendre(j - i, q)``.  Not symmetric.
* ``28, 36``  Paley's second construction, ``q = 13, 17`` (primes, q = 1 mod 4):
  ``S = [[0, 1^T], [1, Q]]`` (symmetric), every 0 of ``S`` replaced by
  ``[[1, -1], [-1, -1]]`` and every +-1 by ``+-[[1, 1], [1, -1]]``.
* ``40``      Sylvester doubling of 20: ``[[H_20, H_20], [H_20, -H_20]]``.

The matrix of order ``n = m * 2**k`` is ``kron(H_m, H_{2**k})``: the small
dense factor acts on the *slow* index.  Writing ``i = a * 2**k + b``,
``H[i, j] = H_m[a, c] * H_{2**k}[b, d]`` for ``j = c * 2**k + d``.  The fast
transform therefore views the last dimension as ``[m, 2**k]``, runs a
Walsh-Hadamard butterfly over contiguous chunks of ``2**k`` and then a dense
``m x m`` matmul across the chunks.

When both 20 and 40 divide ``n`` with a power-of-two quotient (``n = 40 * 2**k``)
the factor ``m = 40`` is used, as in QuaRot; otherwise the factorisation is unique.

Convention
----------
``hadamard_transform(x)`` computes ``x @ H.T`` along the last dimension, i.e.
``y[..., i] = sum_j H[i, j] * x[..., j]`` (each row vector is multiplied by
``H`` from the left), scaled by ``1 / sqrt(n)`` when ``normalize=True``.
Because the Paley-based matrices are not symmetric, ``transpose=True`` computes
``x @ H`` instead; that is the inverse of the normalised transform.

Sizes with no construction (e.g. 4864 = 19 * 256) can use
``block_hadamard_transform`` with ``largest_hadamard_block(n)``: a
block-diagonal matrix of Hadamard blocks.  It is orthogonal, but it is *not* a
Hadamard matrix of order ``n`` and mixes only within each block.
"""

from __future__ import annotations

import functools
import math
import operator

import torch

from .reference import check_features

__all__ = [
    "HADAMARD_BASE_SIZES",
    "block_hadamard_transform",
    "hadamard_factorization",
    "hadamard_matrix",
    "hadamard_transform",
    "is_hadamard_size",
    "largest_hadamard_block",
    "random_hadamard_matrix",
]

# Odd-part carriers m such that a Hadamard matrix of order m is built here.
# 1 stands for pure Sylvester (powers of two).
HADAMARD_BASE_SIZES = (1, 12, 20, 28, 36, 40)

# Order in which factorisation tries the bases.  Only 20 and 40 can both match
# (same odd part 5); 40 is tried first so that it is actually used.
_FACTORIZATION_ORDER = (1, 40, 36, 28, 20, 12)

_SUPPORTED_FORMS = "n = 2**k or n = m * 2**k with m in (12, 20, 28, 36, 40), k >= 0"


# ---------------------------------------------------------------------------
# Size helpers
# ---------------------------------------------------------------------------


def _as_int(n, name: str = "n") -> int:
    if isinstance(n, bool):
        raise TypeError(f"{name} must be an integer, got bool {n!r}")
    try:
        return operator.index(n)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(n).__name__} {n!r}") from None


def _is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _two_adic_valuation(n: int) -> int:
    """Largest k with 2**k dividing n (n > 0)."""
    return (n & -n).bit_length() - 1


def hadamard_factorization(n: int) -> tuple[int, int] | None:
    """Return ``(m, k)`` with ``n == m * 2**k`` and ``m`` in ``HADAMARD_BASE_SIZES``.

    Prefers ``m = 1`` (pure Sylvester).  For ``n = 40 * 2**k`` returns
    ``(40, k)`` rather than ``(20, k + 1)``.  Returns ``None`` when no
    construction covers ``n`` (including ``n <= 0``).
    """
    n = _as_int(n)
    if n <= 0:
        return None
    for m in _FACTORIZATION_ORDER:
        if n % m == 0 and _is_power_of_two(n // m):
            return m, (n // m).bit_length() - 1
    return None


def is_hadamard_size(n: int) -> bool:
    """True when ``hadamard_matrix(n)`` / ``hadamard_transform`` support order ``n``."""
    return hadamard_factorization(n) is not None


def _require_factorization(n: int) -> tuple[int, int]:
    factors = hadamard_factorization(n)
    if factors is None:
        raise ValueError(
            f"no Hadamard matrix construction for n={n}; supported: {_SUPPORTED_FORMS}. "
            f"For other sizes use block_hadamard_transform(x, largest_hadamard_block(n))."
        )
    return factors


def largest_hadamard_block(n: int) -> int:
    """Largest supported Hadamard order that divides ``n`` (fallback block size).

    Example: ``4864 = 19 * 256`` has no construction, so the answer is 256.
    Always at least 1.
    """
    n = _as_int(n)
    if n <= 0:
        raise ValueError(f"n must be positive, got n={n}")
    best = 1
    for m in HADAMARD_BASE_SIZES:
        if n % m == 0:
            # m * 2**j divides n  <=>  2**j divides n // m
            best = max(best, m * (1 << _two_adic_valuation(n // m)))
    return best


# ---------------------------------------------------------------------------
# Matrix constructions (exact +-1 integers, built in float64)
# ---------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _legendre_symbol(a: int, q: int) -> int:
    """Quadratic character of a modulo the odd prime q: 0, +1 or -1 (Euler's criterion)."""
    a %= q
    if a == 0:
        return 0
    return 1 if pow(a, (q - 1) // 2, q) == 1 else -1


def _jacobsthal_matrix(q: int) -> torch.Tensor:
    """Q[i, j] = legendre(j - i, q); antisymmetric for q = 3 mod 4, symmetric for q = 1 mod 4."""
    chi = [_legendre_symbol(d, q) for d in range(q)]
    rows = [[chi[(j - i) % q] for j in range(q)] for i in range(q)]
    return torch.tensor(rows, dtype=torch.float64)


def _paley_core(q: int, sign_of_first_column: int) -> torch.Tensor:
    """The (q+1)x(q+1) conference-type matrix S = [[0, 1^T], [sign * 1, Q]]."""
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    s[0, 1:] = 1.0
    s[1:, 0] = float(sign_of_first_column)
    s[1:, 1:] = _jacobsthal_matrix(q)
    return s


def _paley_first(q: int) -> torch.Tensor:
    """Hadamard matrix of order q + 1 for a prime q = 3 mod 4.

    S is antisymmetric with S S^T = q I, so (I + S)(I + S)^T = (q + 1) I.
    """
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, got q={q}")
    s = _paley_core(q, sign_of_first_column=-1)
    return torch.eye(q + 1, dtype=torch.float64) + s


def _paley_second(q: int) -> torch.Tensor:
    """Hadamard matrix of order 2 (q + 1) for a prime q = 1 mod 4.

    S is symmetric with S S^T = q I and zero diagonal.  Replacing 0 by B and
    +-1 by +-A, A = [[1, 1], [1, -1]], B = [[1, -1], [-1, -1]], gives
    H = kron(S, A) + kron(I, B); since A A^T = B B^T = 2 I and
    A B^T + B A^T = 0, H H^T = 2 q I + 2 I.
    """
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 mod 4, got q={q}")
    s = _paley_core(q, sign_of_first_column=1)
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(s, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


def _sylvester_matrix(k: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester Hadamard matrix of order 2**k (symmetric)."""
    h = torch.ones(1, 1, dtype=dtype)
    for _ in range(k):
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)], dim=0)
    return h


@functools.lru_cache(maxsize=None)
def _cached_base_matrix(m: int) -> torch.Tensor:
    # Shared cached tensor: never hand it out, never modify it in place.
    if m == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    if m == 12:
        return _paley_first(11)
    if m == 20:
        return _paley_first(19)
    if m == 28:
        return _paley_second(13)
    if m == 36:
        return _paley_second(17)
    if m == 40:
        h20 = _cached_base_matrix(20)
        return torch.cat([torch.cat([h20, h20], dim=1), torch.cat([h20, -h20], dim=1)], dim=0)
    raise ValueError(f"no base Hadamard matrix of order {m}; bases are {HADAMARD_BASE_SIZES}")


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unnormalised Hadamard matrix of order n (+-1 entries, ``H @ H.T == n * I``).

    ``H = kron(H_m, H_{2**k})`` for ``(m, k) = hadamard_factorization(n)``.
    Builds the dense n x n matrix: meant for tests and small n; use
    ``hadamard_transform`` to apply it.  Returns a fresh tensor on the CPU.
    Raises ValueError for unsupported n.
    """
    n = _as_int(n)
    m, k = _require_factorization(n)
    base = _cached_base_matrix(m).to(dtype=dtype, copy=True)
    if k == 0:
        return base
    sylvester = _sylvester_matrix(k, dtype=dtype)
    if m == 1:
        return sylvester
    return torch.kron(base, sylvester)


def random_hadamard_matrix(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Randomised orthogonal Hadamard rotation ``H @ diag(s) / sqrt(n)`` (QuaRot style).

    ``s`` is a vector of random signs drawn from a CPU ``torch.Generator``
    seeded with ``seed``, so the result is deterministic per (n, seed).
    """
    n = _as_int(n)
    seed = _as_int(seed, "seed")
    _require_factorization(n)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1
    h = hadamard_matrix(n, dtype=torch.float64)
    # Scale column j by signs[j] (right-multiplication by a diagonal).
    rotation = h * signs.to(torch.float64).unsqueeze(0) / math.sqrt(n)
    return rotation.to(dtype)


# ---------------------------------------------------------------------------
# Fast transform
# ---------------------------------------------------------------------------


def _check_input(x: torch.Tensor, op: str = "hadamard_transform") -> None:
    """The checks of a transform's input; ``op`` names the function called, in the errors."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype (fp16/bf16/fp32/fp64), got {x.dtype}")
    check_features(op, x)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision inputs are accumulated in fp32; fp64 stays fp64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _walsh_hadamard_last_dim(rows: torch.Tensor) -> torch.Tensor:
    """Unnormalised Sylvester transform along the last dim (a power of two).

    Radix-2 butterfly: at step h the index is split as (outer, bit, inner=h)
    and (x0, x1) -> (x0 + x1, x0 - x1) on that bit.  log2(n) passes, two
    ping-pong buffers; the input tensor is only read.
    """
    n = rows.shape[-1]
    if n == 1:
        return rows.clone()
    lead = rows.shape[:-1]
    if (rows.requires_grad and torch.is_grad_enabled()) or torch.compiler.is_compiling():
        # out= buffers support neither autograd nor torch.compile (views as out=): same butterfly, fresh
        # tensors per pass.
        y = rows
        h = 1
        while h < n:
            pairs = y.reshape(*lead, n // (2 * h), 2, h)
            even, odd = pairs[..., 0, :], pairs[..., 1, :]
            y = torch.stack((even + odd, even - odd), dim=-2).reshape(*lead, n)
            h *= 2
        return y
    # Fresh contiguous buffers (empty_like would copy odd strides of `rows`).
    buffers = [torch.empty(rows.shape, dtype=rows.dtype, device=rows.device)]
    if n > 2:
        buffers.append(torch.empty_like(buffers[0]))
    src = rows
    h, step = 1, 0
    while h < n:
        dst = buffers[step % len(buffers)]
        src_pairs = src.reshape(*lead, n // (2 * h), 2, h)
        dst_pairs = dst.view(*lead, n // (2 * h), 2, h)
        torch.add(src_pairs[..., 0, :], src_pairs[..., 1, :], out=dst_pairs[..., 0, :])
        torch.sub(src_pairs[..., 0, :], src_pairs[..., 1, :], out=dst_pairs[..., 1, :])
        src = dst
        h, step = 2 * h, step + 1
    return src


def hadamard_transform(
    x: torch.Tensor, normalize: bool = True, *, transpose: bool = False
) -> torch.Tensor:
    """Apply the Hadamard matrix of order ``n = x.shape[-1]`` along the last dim.

    Returns ``x @ H.T`` (``y[..., i] = sum_j H[i, j] x[..., j]``) with
    ``H = hadamard_matrix(n)``, or ``x @ H`` when ``transpose=True``; scaled by
    ``1 / sqrt(n)`` when ``normalize`` (then the map is orthogonal and the
    ``transpose=True`` transform is its inverse).

    Any leading shape and device; computed in fp32 (fp64 for fp64 input) and
    returned in ``x.dtype``.  Never builds the n x n matrix: a butterfly over
    the 2**k factor plus an m x m matmul for the small factor.
    """
    _check_input(x)
    n = x.shape[-1]
    m, k = _require_factorization(n)
    power_of_two = 1 << k
    compute_dtype = _compute_dtype(x.dtype)

    lead_shape = x.shape[:-1]
    rows = x.reshape(-1, n).to(compute_dtype)  # may alias x; only read below
    if rows.shape[0] == 0:
        return torch.empty_like(x)

    # Sylvester factor (symmetric, so transpose does not change it): acts on
    # each contiguous chunk of 2**k entries.
    y = _walsh_hadamard_last_dim(rows.reshape(-1, power_of_two))

    if m > 1:
        base = _cached_base_matrix(m).to(device=x.device, dtype=compute_dtype)
        if transpose:
            base = base.T
        # Small factor mixes the m chunks: y[a, :] = sum_c H_m[a, c] y[c, :].
        y = torch.matmul(base, y.view(-1, m, power_of_two))
    y = y.view(-1, n)

    if normalize:
        y = y * (1.0 / math.sqrt(n))
    return y.to(x.dtype).view(*lead_shape, n)


def check_block_size(block_size, n: int) -> int:
    """``block_size`` as an int, if it is a supported Hadamard order dividing ``n``; else a clear error.
    (Every backend of the blocked transform checks here first: a block that does not divide the row
    would mix neighbouring rows.)"""
    block_size = _as_int(block_size, "block_size")
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    if n % block_size != 0:
        raise ValueError(f"block_size={block_size} does not divide the last dimension {n}")
    if not is_hadamard_size(block_size):
        raise ValueError(
            f"block_size={block_size} is not a supported Hadamard order; supported: {_SUPPORTED_FORMS}"
        )
    return block_size


def block_hadamard_transform(
    x: torch.Tensor, block_size: int, *, transpose: bool = False
) -> torch.Tensor:
    """Fallback for sizes with no Hadamard construction (e.g. 4864 = 19 * 256).

    Applies the normalised ``hadamard_transform`` independently to each
    consecutive block of ``block_size`` entries along the last dim, i.e.
    multiplies by the block-diagonal matrix ``diag(H_b, ..., H_b) / sqrt(b)``.
    That matrix is orthogonal (norms are preserved, ``transpose=True``
    inverts it) but it is NOT a Hadamard matrix of order n: it only mixes
    entries inside a block, so outliers are spread less than by a full
    Hadamard rotation.  ``largest_hadamard_block(n)`` picks the block size.
    """
    _check_input(x, "block_hadamard_transform")
    n = x.shape[-1]
    block_size = check_block_size(block_size, n)
    blocks = x.reshape(*x.shape[:-1], n // block_size, block_size)
    y = hadamard_transform(blocks, normalize=True, transpose=transpose)
    return y.reshape(x.shape)


# ---------------------------------------------------------------------------
# Rotations fused into weights (QuaRot): per-head blocks and PCA
# ---------------------------------------------------------------------------


def block_diagonal_hadamard(block_size: int, count: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``kron(I_count, H_b / sqrt(b))``: the normalised Hadamard of order ``block_size`` applied to each
    of ``count`` consecutive blocks (e.g. one attention head each). Orthogonal; ``x @ M.T`` equals
    ``block_hadamard_transform(x, block_size)`` on a last dimension of ``block_size * count``."""
    block_size = _as_int(block_size, "block_size")
    count = _as_int(count, "count")
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    h = hadamard_matrix(block_size, dtype=torch.float64) / math.sqrt(block_size)
    return torch.kron(torch.eye(count, dtype=torch.float64), h).to(dtype)


def pca_rotation(second_moment: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``V`` [n, n] whose columns are the eigenvectors of the symmetric matrix
    ``second_moment`` (e.g. ``X^T X`` of activations), by decreasing eigenvalue, in float64.

    Rotating row vectors ``x -> x @ V`` expresses them in the principal axes: coordinate ``i`` then has
    mean square ``lambda_i / n_rows``. Each column's sign is fixed (largest-magnitude entry positive),
    so the result does not depend on the eigen-solver's arbitrary signs."""
    if not isinstance(second_moment, torch.Tensor) or second_moment.dim() != 2 or \
            second_moment.shape[0] != second_moment.shape[1]:
        raise ValueError("second_moment must be a square 2-D tensor")
    if not torch.isfinite(second_moment).all():
        raise ValueError("second_moment contains NaN or Inf")
    m = second_moment.detach().to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh((m + m.T) / 2)  # ascending
    order = torch.argsort(eigenvalues, descending=True, stable=True)
    vectors = vectors[:, order]
    pivot = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivot, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    return vectors * signs[None, :]


__all__ += ["block_diagonal_hadamard", "pca_rotation"]


def random_signs(n: int, seed: int) -> torch.Tensor:
    """The random +-1 vector ``s`` (float64) of ``random_hadamard_matrix(n, seed) = H diag(s) / sqrt(n)``,
    for applying that rotation with the fast transform: ``x @ R = hadamard_transform(x, transpose=True) * s``."""
    n = _as_int(n)
    seed = _as_int(seed, "seed")
    _require_factorization(n)
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    # Same draw as random_hadamard_matrix.
    return (torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64) * 2 - 1).to(torch.float64)


__all__ += ["random_signs"]
