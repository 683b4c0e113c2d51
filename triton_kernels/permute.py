"""The input gather of act-order layers, ``y[m, j] = x[m, permutation[j]]``, in Triton.

Semantics: ``quantkern.reference.permute_columns`` (``x.index_select(-1, permutation)``), bit-exact: values are
only moved. Tiling: one program per ROWS rows and BLOCK output columns; it loads the BLOCK permutation entries
once and gathers each row's values at them (a row of x is a few KiB: cache hits), then stores them contiguously.
Layout: x [M, K] contiguous, permutation int64 [K], y [M, K] in x's dtype.
"""

import torch
import triton
import triton.language as tl

from quantkern._fake import permute_columns_fake

from ._host import cdiv, triton_op

ROWS = 4
BLOCK = 1024


@triton.jit
def _permute_columns_kernel(x_ptr, permutation_ptr, y_ptr, M, K, ROWS_PER_PROGRAM: tl.constexpr,
                            BLOCK_COLUMNS: tl.constexpr):
    columns = tl.program_id(1) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    column_ok = columns < K
    sources = tl.load(permutation_ptr + columns, mask=column_ok, other=0)
    for r in tl.static_range(ROWS_PER_PROGRAM):
        row = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM + r
        mask = column_ok & (row < M)
        values = tl.load(x_ptr + row * K + sources, mask=mask)
        tl.store(y_ptr + row * K + columns, values, mask=mask)


@triton_op("quantkern_triton::permute_columns", permute_columns_fake)
def _permute_columns_op(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    x, permutation = x.contiguous(), permutation.contiguous()  # the kernel indexes both as contiguous
    y = permute_columns_fake(x, permutation)
    rows, features = x.shape
    if rows:
        _permute_columns_kernel[(cdiv(rows, ROWS), cdiv(features, BLOCK))](x, permutation, y, rows, features,
                                                                            ROWS_PER_PROGRAM=ROWS, BLOCK_COLUMNS=BLOCK)
    return y


def permute_columns(x: torch.Tensor, permutation: torch.Tensor) -> torch.Tensor:
    """Triton backend of ``quantkern.ops.permute_columns`` for a 2-D ``x`` [M, K] (copied first if not
    contiguous, as is the permutation)."""
    return _permute_columns_op(x, permutation)
