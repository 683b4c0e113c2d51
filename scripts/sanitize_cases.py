"""A few small cases of every CUDA kernel, for compute-sanitizer (memcheck, racecheck): partial M and
N tiles, every W4A16 tile config, split-K on and off, sym/asym, group 32 and per-channel, both
dtypes, odd and misaligned activation rows. Each case is also checked against the reference.

    compute-sanitizer --tool racecheck python scripts/sanitize_cases.py [GROUP ...]

GROUP: activation, w4a16, int_gemm, hadamard, permute (default: all that the build has).
"""

import sys

import torch

from quantkern import backends, ops, reference
from quantkern.format import unpack_int4_signed
from quantkern.layout_cuda import prepare_w4a16, w4a16_linear, wgmma_kernel_available


def relative_error(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check_chain_in_graph(chain, static_x, label):
    """chain(static_x) run eagerly, then captured in a CUDA graph and replayed: the same bits."""
    want = chain(static_x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain(static_x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(got, want), label
    print(label, flush=True)


def activation_cases():
    # (on sm_90 the last four take the cluster path: 8, 8 (ragged), 7 and 8 blocks a row)
    for rows, features, dtype, bits in [(3, 576, torch.float16, 4), (9, 1030, torch.bfloat16, 8),
                                        (5, 577, torch.float16, 8), (2, 4096, torch.float32, 4),
                                        (2, 8192, torch.float32, 4), (3, 16392, torch.bfloat16, 4),
                                        (1, 14336, torch.bfloat16, 8), (2, 65536, torch.float16, 4)]:
        x = torch.randn(rows, features, device="cuda").to(dtype)
        q, s = torch.ops.quantkern.quantize_per_token(x, bits, 1.0)
        q_ref, s_ref = reference.quantize_per_token(x, bits)
        assert torch.equal(q, q_ref) and torch.equal(s, s_ref), (rows, features, dtype, bits)
        print("quantize_per_token", rows, features, dtype, bits, "bit-exact", flush=True)


def w4a16_cases():
    # (K, N, M, group, symmetric, dtype, split_k (0: automatic), tile_m (0: automatic))
    cases = [(576, 1536, 1, 64, True, torch.float16, 0, 0), (1536, 576, 33, 32, False, torch.bfloat16, 0, 0),
             (576, 576, 7, -1, False, torch.float16, 3, 16), (576, 576, 130, 64, True, torch.bfloat16, 2, 128),
             (896, 1216, 65, 128, False, torch.float16, 0, 64),
             # the small-M kernel: odd strips and k-tiles, forced splits, 16-warp blocks, two token tiles
             (192, 80, 5, 64, False, torch.bfloat16, 2, 1), (4096, 1024, 12, 32, True, torch.float16, 0, 0),
             (576, 4864, 3, -1, True, torch.bfloat16, 0, 1), (192, 400, 13, 64, False, torch.float16, 2, 1),
             (1536, 576, 16, 128, True, torch.bfloat16, 0, 0),
             # 4-warp blocks (320 blocks: between 2 and 4 per SM on 128-132 SMs), warps without a chunk (K = 192)
             (192, 10240, 1, 64, False, torch.bfloat16, 0, 0), (192, 10240, 16, 32, True, torch.float16, 0, 0),
             # 2-warp blocks (640 blocks: between 4 and 8 per SM), one token tile, groups other than 32
             (192, 20480, 1, 64, False, torch.bfloat16, 0, 0), (320, 20480, 8, -1, True, torch.float16, 0, 0),
             # below 5 tokens, group 32 with zeros: the weight ring (Hopper; every lane copies a scale or zero
             # piece; odd k-tiles, split K) and, with tile_m 2, the register stages
             (576, 400, 4, 32, False, torch.float16, 2, 0), (192, 80, 2, 32, False, torch.bfloat16, 0, 0),
             (576, 400, 3, 32, False, torch.bfloat16, 2, 2),
             # below 5 tokens, symmetric, group 128 / per channel: the early refill (3-4 chunks per warp, odd k-tiles)
             (6208, 80, 2, -1, True, torch.float16, 1, 1), (8192, 48, 1, 128, True, torch.bfloat16, 1, 1),
             # 9-16 tokens a tile where 64-channel blocks fill the SMs (132 of them; Hopper's shared memory): warp
             # pairs sharing each chunk's activations (odd k-tiles, pairs without a chunk, a half-empty last block)
             (576, 8192, 13, 64, False, torch.bfloat16, 0, 1), (192, 8240, 16, 32, True, torch.float16, 0, 0),
             (1024, 8192, 31, 128, True, torch.float16, 0, 1)]
    if wgmma_kernel_available():  # the Hopper kernel: partial blocks and tiles, splits inside groups
        cases += [(192, 208, 65, 32, False, torch.bfloat16, 3, 4), (576, 576, 100, 64, False, torch.float16, 2, 3),
                  (1536, 576, 129, -1, True, torch.bfloat16, 3, 4), (576, 208, 300, 64, False, torch.float16, 2, 5),
                  # one token tile of fewer tokens: a box of fewer rows, the tile's other rows zeroed once
                  (576, 400, 20, 64, False, torch.bfloat16, 2, 3), (1024, 256, 40, 128, True, torch.float16, 0, 4),
                  # bf16 staged as fp16 (from 1024 tokens for weights of up to 2^24 codes, stages_bf16 in
                  # csrc/w4a16_gemm.cu): the staging pass, fp16 tiles, partial blocks, splits
                  (192, 208, 1025, 32, False, torch.bfloat16, 3, 5), (1536, 576, 1100, 128, True, torch.bfloat16, 0, 0)]
    for k, n, m, group, symmetric, dtype, split_k, tile_m in cases:
        w = torch.randn(n, k, device="cuda") / k ** 0.5
        qw = reference.quantize_weight(w, 4, group, symmetric, scale_dtype=dtype)
        prepared = prepare_w4a16(qw, dtype)
        x = torch.randn(m, k, device="cuda").to(dtype)
        bias = torch.randn(n, device="cuda").to(dtype)
        y = w4a16_linear(x, prepared, bias, split_k=split_k, tile_m=tile_m)
        # Against the reference rounded to y's dtype, as tests/test_w4a16_cuda.py does: against the fp32 one a bf16
        # output's own rounding reaches ~2e-3 where y has few elements (8192 x 48 at M = 1 measured 2.006e-3).
        y_ref = reference.weight_only_linear(x.float(), qw, bias.float()).to(dtype)
        error = relative_error(y, y_ref)
        assert error < 2e-3, (k, n, m, group, error)
        print("w4a16_gemm", k, n, m, group, symmetric, dtype, split_k, tile_m, f"error {error:.1e}", flush=True)
    # Back to back in a captured CUDA graph, each call reading the previous one's output: on sm_90 every call
    # after the first is launched as the previous kernel's programmatic dependent (split K, two token tiles, the
    # weight ring).
    for k, m, group, symmetric in ((576, 3, 64, True), (1536, 16, 32, False), (576, 2, 32, False)):
        w = torch.randn(k, k, device="cuda") / k ** 0.5
        prepared = prepare_w4a16(reference.quantize_weight(w, 4, group, symmetric), torch.float16)

        def chain(t):
            for _ in range(3):
                t = w4a16_linear(t, prepared)
            return t

        check_chain_in_graph(chain, torch.randn(m, k, device="cuda", dtype=torch.float16),
                             f"w4a16_gemm chained in a CUDA graph {k} {m} {group} {symmetric}")


def int_gemm_cases():
    # (M, K, N, weight bits, act bits, group, split_k (0: automatic), config (0: automatic))
    cases = [(3, 576, 200, 4, 4, -1, 0, 0), (5, 896, 136, 8, 8, 32, 3, 1), (70, 576, 264, 4, 8, 64, 1, 2),
             (130, 1024, 392, 4, 4, 128, 2, 3), (17, 160, 64, 8, 8, -1, 0, 3)]
    if torch.cuda.get_device_capability() == (9, 0):  # the wgmma kernel: both tiles, split K, partial tiles;
        cases += [(130, 576, 200, 4, 4, -1, 0, 6), (300, 896, 264, 8, 8, -1, 2, 7), (257, 160, 72, 4, 8, -1, 1, 7)]
        # the few-token kernel: one / two token tiles, grid.z, clusters of 1-3 blocks, partial blocks
        cases += [(1, 160, 24, 4, 4, -1, 1, 8), (16, 896, 200, 8, 8, -1, 3, 8), (20, 576, 72, 4, 8, -1, 2, 8)]
        # and its narrow blocks (on 132 SMs: 4 warps; at two token tiles 2 warps and 1)
        cases += [(2, 384, 12288, 4, 4, -1, 0, 8), (12, 256, 17408, 4, 4, -1, 0, 8), (12, 256, 26624, 4, 4, -1, 0, 8)]
    from quantkern.layout_int import activations_packed, int_gemm_cuda

    for m, k, n, bits, act_bits, group, split_k, config in cases:
        qw = reference.quantize_weight(torch.randn(n, k, device="cuda"), bits, group, scale_dtype=torch.bfloat16)
        prepared = ops.prepare_int_weight(qw, act_bits, torch.bfloat16, backend="cuda")
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        bias = torch.randn(n, device="cuda")
        # (W4A4 on sm_90 at M <= 16: packed int4 codes, which the few-token kernel widens in registers)
        q, sx = ops.quantize_per_token(x, act_bits, packed=activations_packed(prepared.tensors, m))
        y = int_gemm_cuda(q, sx, prepared.tensors, bias, torch.bfloat16, split_k, config)
        error = relative_error(y, reference.quantized_activation_linear(x, qw, act_bits, bias))
        assert error < 1e-2, (m, k, n, bits, act_bits, group, split_k, config, error)
        print("int_gemm", m, k, n, f"W{bits}A{act_bits}", group, split_k, config, f"error {error:.1e}", flush=True)
    if torch.cuda.get_device_capability() == (9, 0):
        # W4A4 layers back to back in a captured graph, each quantizer (one warp a row, then the cluster kernel at
        # K = 9216) reading the previous GEMM's output, each GEMM launched as its quantizer's programmatic dependent.
        for m, k in ((1, 576), (2, 9216)):
            weights = [reference.quantize_weight(torch.randn(k, k, device="cuda") / k ** 0.5, 4, -1,
                                                 scale_dtype=torch.bfloat16) for _ in range(2)]
            prepared = [ops.prepare_int_weight(qw, 4, torch.bfloat16, backend="cuda") for qw in weights]

            def chain(t):
                for p in prepared:
                    t = ops.quantized_activation_linear(t, p, 4, None)
                return t

            check_chain_in_graph(chain, torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                                 f"int_gemm W4A4 chained in a CUDA graph {m} {k}")


def hadamard_cases():
    # (rows, n, dtype, bits (0: rotation only), block_size): direct path (576 = 36 x 16, 4096 fp32, 96), indirect
    # path (32768, 24576 = 12 x 2048), the small dense kernel (12), blocked mode (896 / 128), misaligned rows;
    # the tensor-core kernels of csrc/hadamard_mma.cu (fp16/bf16: 1024, 4096, 16384 with the shared-memory
    # exchange, 14336 with the shared tile; 600 rows: more than two rows a block).
    cases = [(3, 576, torch.float16, 4, 0), (600, 14336, torch.float16, 4, 0), (2, 4096, torch.float32, 8, 0),
             (5, 96, torch.float32, 4, 0), (2, 12, torch.float16, 8, 0), (2, 32768, torch.float16, 0, 0),
             (2, 24576, torch.bfloat16, 4, 0), (3, 896, torch.float16, 4, 128), (4, 14336, torch.float16, 4, 0),
             (3, 14336, torch.bfloat16, 8, 0),
             (2, 4096, torch.bfloat16, 8, 0), (3, 16384, torch.float16, 4, 0), (2, 1024, torch.bfloat16, 4, 0)]
    backends.status("cuda")  # loads quantkern._C (registers torch.ops.quantkern.*)
    tensor_core_sizes = set(backends.cuda_build_info().get("hadamard_quantize_tensor_core_sizes", ()))
    for rows, n, dtype, bits, block in cases:
        x = torch.randn(rows, n, device="cuda").to(dtype)
        rotated = ops.hadamard(x, backend="reference", block_size=block or None)
        if bits == 0:
            error = relative_error(torch.ops.quantkern.hadamard(x, block), rotated)
        else:
            q, s = torch.ops.quantkern.hadamard_quantize(x, bits, 1.0, block)
            q_ref, s_ref = reference.quantize_per_token(rotated, bits)
            if n in tensor_core_sizes and dtype != torch.float32 and not block:
                # The tensor-core path's codes may differ by 1 from the reference's (tests/test_hadamard_kernels.py
                # bounds them against the exact rotation): count only larger differences.
                codes = [unpack_int4_signed(c).int() if bits == 4 else c.int() for c in (q, q_ref)]
                wrong = ((codes[0] - codes[1]).abs() > 1).float().mean().item()
            else:
                wrong = (q != q_ref).float().mean().item()
            error = relative_error(s, s_ref) + wrong
        assert error < 1e-2, (rows, n, dtype, bits, block, error)
        print("hadamard", rows, n, dtype, bits, block, f"error {error:.1e}", flush=True)
    base = torch.randn(3 * 1024 + 1, device="cuda", dtype=torch.float16)
    torch.ops.quantkern.hadamard_quantize(base[1:].view(3, 1024), 4, 1.0, 0)  # misaligned: copied first
    # int4 codes one per byte (packed=False): the tensor-core kernels' byte stores (4096: registers, 14336: the
    # staged tile) and the fp32-butterfly path's spread of packed bytes (576).
    for rows, n, dtype in ((3, 4096, torch.float16), (4, 14336, torch.bfloat16), (3, 576, torch.float16)):
        x = torch.randn(rows, n, device="cuda").to(dtype)
        q, s = torch.ops.quantkern.hadamard_quantize(x, 4, 1.0, 0)
        q_unpacked, _ = torch.ops.quantkern.hadamard_quantize(x, 4, 1.0, 0, False)
        assert torch.equal(q_unpacked, unpack_int4_signed(q)), (rows, n, dtype)
        print("hadamard unpacked int4", rows, n, dtype, flush=True)


def permute_cases():
    # The act-order gather: partial column blocks and row groups, 2- and 4-byte words; then gather -> GEMM pairs
    # in a CUDA graph, where each small-M GEMM is the gather's programmatic dependent on sm_90.
    # More than 16 rows: the staged kernel, 4 / 2 / 1 rows a block, 16-byte copies or not.
    for rows, n, dtype in ((1, 576, torch.float16), (5, 129, torch.bfloat16), (6, 4864, torch.float32),
                           (19, 4096, torch.float16), (17, 129, torch.bfloat16), (18, 14336, torch.float16),
                           (17, 24576, torch.float32)):
        x = torch.randn(rows, n, device="cuda").to(dtype)
        permutation = torch.randperm(n, device="cuda")
        assert torch.equal(torch.ops.quantkern.permute_columns(x, permutation), x.index_select(-1, permutation))
        print("permute_columns", rows, n, dtype, flush=True)
    for k, m in ((576, 3), (1536, 16)):
        prepared = prepare_w4a16(reference.quantize_weight(torch.randn(k, k, device="cuda") / k ** 0.5, 4, 64, True),
                                 torch.float16)
        permutation = torch.randperm(k, device="cuda")

        def chain(t):
            for _ in range(3):
                t = w4a16_linear(ops.permute_columns(t, permutation), prepared)
            return t

        check_chain_in_graph(chain, torch.randn(m, k, device="cuda", dtype=torch.float16),
                             f"permute_columns then w4a16_gemm in a CUDA graph {k} {m}")


def block_rotation_cases():
    # csrc/block_rotation.cu: tiles of 4 and 8 rows (the last partial), b = 64 (576: a last step of one block) and 128,
    # int4 and int8, fp16 and bf16, clusters (few rows on the H100: 16 CTAs at 9 rows of 8192 and 1 of 14336, 8 at 17
    # of 4096; many wide rows: 8192 and 14336) and none, a misaligned input (copied first); then in a CUDA graph.
    for rows, k, b, dtype in ((1, 576, 64, torch.float16), (6, 896, 64, torch.bfloat16), (17, 4096, 128, torch.float16),
                              (9, 8192, 128, torch.bfloat16), (1, 14336, 128, torch.float16),
                              (35, 2048, 64, torch.float16), (300, 8192, 128, torch.float16),
                              (290, 14336, 128, torch.bfloat16)):
        x = torch.randn(rows, k, device="cuda").to(dtype)
        rotation = torch.linalg.qr(torch.randn(b, b, device="cuda"))[0].contiguous()
        for bits in (4, 8):
            q, s = torch.ops.quantkern.block_rotate_quantize(x, rotation, bits, 0.9)
            q_ref, s_ref = reference.quantize_per_token(reference.block_rotate(x, rotation), bits, 0.9)
            assert torch.allclose(s, s_ref, rtol=2 ** -7, atol=0), (rows, k, b, dtype, bits)
        print("block_rotate_quantize", rows, k, b, dtype, flush=True)
    base = torch.randn(1 + 3 * 1024, device="cuda", dtype=torch.float16)
    torch.ops.quantkern.block_rotate_quantize(base[1:].view(3, 1024), torch.eye(128, device="cuda"), 4, 1.0)
    rotation = torch.linalg.qr(torch.randn(128, 128, device="cuda"))[0].contiguous()
    check_chain_in_graph(lambda t: torch.ops.quantkern.block_rotate_quantize(t, rotation, 4, 1.0)[1].unsqueeze(1) * t,
                         torch.randn(12, 4096, device="cuda", dtype=torch.float16), "block_rotate_quantize in a graph")


if __name__ == "__main__":
    if not backends.status("cuda").available or not torch.cuda.is_available():
        sys.exit(f"needs the CUDA extension and a GPU: {backends.status('cuda').reason}")
    groups = {"activation": activation_cases, "w4a16": w4a16_cases, "int_gemm": int_gemm_cases}
    if "hadamard" in backends.status("cuda").kernels:
        groups["hadamard"] = hadamard_cases
    if "permute_columns" in backends.status("cuda").kernels:
        groups["permute"] = permute_cases
    if "block_rotate_quantize" in backends.status("cuda").kernels:
        groups["block_rotation"] = block_rotation_cases
    chosen = sys.argv[1:] or list(groups)  # e.g. `sanitize_cases.py int_gemm`: that group only
    unknown = [name for name in chosen if name not in groups]
    if unknown:
        sys.exit(f"unknown case groups {unknown}; choose from {list(groups)}")
    torch.manual_seed(0)  # the same cases every run
    for name in chosen:
        groups[name]()
    torch.cuda.synchronize()
