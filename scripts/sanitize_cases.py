"""A few small cases of every CUDA kernel, for compute-sanitizer (memcheck, racecheck): partial M and
N tiles, every W4A16 tile config, split-K on and off, sym/asym, group 32 and per-channel, both
dtypes, odd and misaligned activation rows. Each case is also checked against the reference.

    compute-sanitizer --tool racecheck python scripts/sanitize_cases.py
"""

import sys

import torch

from quantkern import backends, ops, reference
from quantkern.layout_cuda import prepare_w4a16, w4a16_linear


def relative_error(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def activation_cases():
    for rows, features, dtype, bits in [(3, 576, torch.float16, 4), (9, 1030, torch.bfloat16, 8),
                                        (2, 4096, torch.float32, 4), (5, 577, torch.float16, 8)]:
        x = torch.randn(rows, features, device="cuda").to(dtype)
        q, s = torch.ops.quantkern.quantize_per_token(x, bits, 1.0)
        q_ref, s_ref = reference.quantize_per_token(x, bits)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref), (rows, features, dtype, bits)
        print("quantize_per_token", rows, features, dtype, bits, "bit-exact", flush=True)


def w4a16_cases():
    # (K, N, M, group, symmetric, dtype, split_k (0: automatic), tile_m (0: automatic))
    cases = [(576, 1536, 1, 64, True, torch.float16, 0, 0), (1536, 576, 33, 32, False, torch.bfloat16, 0, 0),
             (576, 576, 7, -1, False, torch.float16, 3, 16), (576, 576, 130, 64, True, torch.bfloat16, 2, 128),
             (896, 1216, 65, 128, False, torch.float16, 0, 64)]
    for k, n, m, group, symmetric, dtype, split_k, tile_m in cases:
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        qw = reference.quantize_weight(w, 4, group, symmetric, scale_dtype=dtype)
        prepared = prepare_w4a16(qw, dtype)
        x = torch.randn(m, k, device="cuda").to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype)
        y = w4a16_linear(x, prepared, bias, split_k=split_k, tile_m=tile_m)
        error = relative_error(y, reference.weight_only_linear(x.float(), qw, bias.float()))
        assert error < 2e-3, (k, n, m, group, error)
        print("w4a16_gemm", k, n, m, group, symmetric, dtype, split_k, tile_m, f"error {error:.1e}", flush=True)


if __name__ == "__main__":
    if not backends.status("cuda").available or not torch.cuda.is_available():
        sys.exit(f"needs the CUDA extension and a GPU: {backends.status('cuda').reason}")
    activation_cases()
    w4a16_cases()
    torch.cuda.synchronize()
