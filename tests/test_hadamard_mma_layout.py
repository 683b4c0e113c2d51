"""CPU emulation of csrc/hadamard_mma.cu's fragment bookkeeping, checked against reference.hadamard.

The tensor-core kernel relies on mma.m16n8k16's register layouts closing on themselves (the loaded 16-byte
words are B fragments; an accumulator pair is a B fragment of the transpose; every lane ends with its own
8 loaded elements). This test rebuilds each lane's fragments exactly as the kernel does, multiplies the
matrices the fragments describe (PTX ISA layouts), rounds where the kernel rounds, and compares the rotated
rows with the fp64 transform. It runs everywhere (no GPU): a layout slip fails here before any GPU time.
"""

import numpy as np
import pytest
import torch

from quantkern.rotation import hadamard_matrix, hadamard_transform

LANES = np.arange(32)
G, T = LANES // 4, LANES % 4  # groupID, thread in group


def round_to(values, dtype):
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).to(dtype).float().numpy()


# --- mma.m16n8k16 fragments (PTX ISA "Matrix Fragments for mma.m16n8k16"), per lane -------------------------

def a_matrix(frag):
    """frag [32, 8] (a0..a7 of each lane) -> A [16, 16]."""
    a = np.zeros((16, 16))
    for i in range(8):
        row = G + 8 * ((i // 2) % 2)
        col = 2 * T + (i % 2) + 8 * (i // 4)
        a[row, col] = frag[:, i]
    return a


def b_matrix(frag):
    """frag [32, 4] (b0..b3 of each lane) -> B [16, 8]."""
    b = np.zeros((16, 8))
    for i in range(4):
        b[2 * T + (i % 2) + 8 * (i // 2), G] = frag[:, i]
    return b


def c_fragment(d):
    """D [16, 8] -> frag [32, 4] (c0..c3 of each lane)."""
    return np.stack([d[G + 8 * (i // 2), 2 * T + (i % 2)] for i in range(4)], axis=1)


def mma(a_frag, b_frag, c_frag=None):
    d = a_matrix(a_frag) @ b_matrix(b_frag)
    out = c_fragment(d)
    return out if c_frag is None else out + c_frag


# --- the kernel's steps ------------------------------------------------------------------------------------

def hadamard16_fragment():
    """hadamard16_fragment: H16 / 16, words 0-3 as a0..a7."""
    lo = np.array([bin(g & (2 * t)).count("1") & 1 for g, t in zip(G, T)])
    hi = lo ^ (G & 1)
    w0 = np.stack([(-1.0) ** lo, (-1.0) ** hi], axis=1) / 16
    return np.concatenate([w0, w0, w0, -w0], axis=1)


def transform_chunk(chunk, dtype):
    """transform_chunk on one 256-element chunk (T values) -> v [32 lanes, 8] fp32."""
    h16 = hadamard16_fragment()
    raw = chunk.reshape(32, 8)  # lane L's 16 bytes: elements 8 L .. 8 L + 7, words (0,1) (2,3) (4,5) (6,7)
    d0 = mma(h16, raw[:, 0:4])
    d1 = mma(h16, raw[:, 4:8])
    b0 = round_to(np.stack([d0[:, 0], d0[:, 1], d1[:, 0], d1[:, 1]], axis=1), dtype)
    b1 = round_to(np.stack([d0[:, 2], d0[:, 3], d1[:, 2], d1[:, 3]], axis=1), dtype)
    e0, e1 = mma(h16, b0), mma(h16, b1)
    return np.stack([e0[:, 0], e0[:, 1], e1[:, 0], e1[:, 1], e0[:, 2], e0[:, 3], e1[:, 2], e1[:, 3]], axis=1)


def chunk_stage_fragment():
    """chunk_stage_fragment: per n-tile nb, the B fragment [32, 4] (b0, b1 as 4 values) of M[k][n] =
    [t == t'] (-1)^(hh hh') (-1)^(kb nb), k = 2 t + hh + 8 kb, n = 2 t' + hh'."""
    frags = []
    for nb in range(2):
        one = (T == G // 2).astype(float)
        cols = []
        for kb in range(2):
            for hh in range(2):
                sign = (-1.0) ** ((kb & nb) + hh * (G & 1))
                cols.append(one * sign)
        frags.append(np.stack(cols, axis=1))
    return frags


def chunk_stage(v, dtype):
    """chunk_stage: chunk bits 0 and 1 of v (list of J [32, 8] arrays) on tensor cores, in place."""
    m = chunk_stage_fragment()
    for q in range(len(v) // 4):
        v0, v1, v2, v3 = (v[4 * q + i] for i in range(4))
        for e in range(0, 8, 2):
            a = round_to(np.stack([v0[:, e], v1[:, e], v0[:, e + 1], v1[:, e + 1],
                                   v2[:, e], v3[:, e], v2[:, e + 1], v3[:, e + 1]], axis=1), dtype)
            d0, d1 = mma(a, m[0]), mma(a, m[1])
            v0[:, e], v1[:, e], v0[:, e + 1], v1[:, e + 1] = d0[:, 0], d0[:, 1], d0[:, 2], d0[:, 3]
            v2[:, e], v3[:, e], v2[:, e + 1], v3[:, e + 1] = d1[:, 0], d1[:, 1], d1[:, 2], d1[:, 3]


def butterflies(v, lo, hi):
    for bit in range(lo, hi):
        for i in range(len(v)):
            if not (i >> bit) & 1:
                a, b = v[i].copy(), v[i | (1 << bit)].copy()
                v[i], v[i | (1 << bit)] = a + b, a - b


def pow2_kernel(x, dtype, chunk_mma):
    """hadamard_quantize_pow2_kernel's rotation of one row x [n] -> v [n] (before the out_scale), chunk bits 0, 1
    on tensor cores (chunk_mma: the kernel does so for fp16 rows) or in fp32."""
    n = x.size
    log_chunks = int(np.log2(n // 256))
    log_j = min(log_chunks, 3)
    J, W = 1 << log_j, 1 << (log_chunks - log_j)
    out = np.zeros(n)
    values = {}  # chunk -> [32, 8], the exchange buffer
    for warp in range(W):
        v = [transform_chunk(x[(warp * J + i) * 256:(warp * J + i + 1) * 256], dtype) for i in range(J)]
        if chunk_mma:
            chunk_stage(v, dtype)
            butterflies(v, 2, log_j)
        else:
            butterflies(v, 0, log_j)
        for i in range(J):
            values[warp * J + i] = v[i]
    per = J // W
    for warp in range(W):
        chunks = [(i // per) * J + warp * per + i % per for i in range(J)]
        v = [values[c].copy() for c in chunks]
        if W > 1:
            butterflies(v, log_j - (log_chunks - log_j), log_j)
        for c, vi in zip(chunks, v):
            out[c * 256:(c + 1) * 256] = vi.reshape(-1)  # lane L, element e -> 8 L + e
    return out


def paley_fragments():
    """make_paley_fragments: H28 padded to 32 x 32, [lane][m-tile r][k-step s] -> a0..a7."""
    h28 = np.zeros((32, 32))
    h28[:28, :28] = hadamard_matrix(28, dtype=torch.float64).numpy()
    frags = np.zeros((2, 2, 32, 8))
    for r in range(2):
        for s in range(2):
            frags[r, s] = np.stack([h28[16 * r + G + 8 * ((i // 2) % 2), 16 * s + 2 * T + (i % 2) + 8 * (i // 4)]
                                    for i in range(8)], axis=1)
    return frags


def ldmatrix_x4_trans(tile, col):
    """ldmatrix.x4.trans with lane l addressing row l, columns col .. col + 7: register i of each lane holds
    matrix i transposed, i.e. (row 8 i + 2 t + h, column col + g) as b-values h = 0, 1."""
    regs = []
    for i in range(4):
        regs.append(np.stack([tile[8 * i + 2 * T + h, col + G] for h in range(2)], axis=1))
    return regs  # 4 x [32, 2]


def paley28_kernel(x, dtype):
    """hadamard_quantize_paley28_kernel's rotation of one row x [14336] -> v [14336] (before the out_scale)."""
    tile = np.zeros((32, 512))
    for chunk in range(56):
        v = round_to(transform_chunk(x[chunk * 256:(chunk + 1) * 256], dtype), dtype)
        tile[chunk // 2, (chunk % 2) * 256:(chunk % 2 + 1) * 256] = v.reshape(-1)
    h28 = paley_fragments()
    out = np.zeros(14336)
    for warp in range(8):
        acc = {}
        for j in range(8):
            col_tile = 4 * warp + j % 4 + (j // 4) * 32
            b = ldmatrix_x4_trans(tile, col_tile * 8)
            for r in range(2):
                acc[j, r] = mma(h28[r, 0], np.concatenate([b[0], b[1]], axis=1))
                acc[j, r] = mma(h28[r, 1], np.concatenate([b[2], b[3]], axis=1), acc[j, r])
        for j in range(4):
            for r in range(2):
                acc[j, r], acc[j + 4, r] = acc[j, r] + acc[j + 4, r], acc[j, r] - acc[j + 4, r]
        for j in range(8):
            col_tile = 4 * warp + j % 4 + (j // 4) * 32
            for r in range(2):
                for e in range(4):
                    block = 16 * r + G + 8 * (e // 2)
                    col = col_tile * 8 + 2 * T + e % 2
                    keep = block < 28
                    out[block[keep] * 512 + col[keep]] = acc[j, r][keep, e]
                    assert np.all(acc[j, r][~keep, e] == 0)  # H28's padded rows
    return out


# chunk_mma: chunk bits 0, 1 on tensor cores (what the kernel does for fp16 rows) or in fp32 (bf16 rows); both
# bookkeepings are checked for both dtypes. 14336 is the paley28 kernel.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, chunk_mma", [(n, c) for n in (1024, 2048, 4096, 8192, 16384) for c in (True, False)]
                         + [(14336, None)])
def test_fragment_bookkeeping_gives_the_hadamard_transform(n, chunk_mma, dtype):
    gen = torch.Generator().manual_seed(n)
    x = (torch.randn(n, generator=gen) * 3).to(dtype)
    x[: n // 7] *= 20
    xf = x.float().numpy().astype(np.float64)
    exact = hadamard_transform(torch.from_numpy(xf)).numpy()  # fp64
    v = paley28_kernel(xf, dtype) if n == 14336 else pow2_kernel(xf, dtype, chunk_mma)
    y = v * 256 / np.sqrt(n)  # out_scale
    # Rounded to x's dtype on the way (stage A's sums; also stage B's for 14336 and for the chunk stage):
    # errors of that size, nothing structural.
    roundings = 2 if n == 14336 or chunk_mma else 1
    unit = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype] * roundings
    rms = np.sqrt(np.mean(exact ** 2))
    assert np.abs(y - exact).max() <= 4 * unit * np.abs(xf).max() * 16
    assert np.sqrt(np.mean((y - exact) ** 2)) <= unit * rms


# --- the unclamped codes: FFMA with the round-to-integer constant, then byte permutes --------------------------

def byte_perm(x, y, selector):
    """__byte_perm(x, y, s) (prmt.b32 default mode): result byte i = byte (s >> 4 i) & 7 of {y, x}."""
    pool = [(x >> (8 * i)) & 0xFF for i in range(4)] + [(y >> (8 * i)) & 0xFF for i in range(4)]
    return sum(pool[(selector >> (4 * i)) & 7] << (8 * i) for i in range(4))


def code_bits(v, inv):
    """fp32(v * inv + 1.5 * 2^23) as bits (the product is exact in fp64, the sum is rounded once to fp32)."""
    return int(np.array(np.float64(v) * np.float64(inv) + 12582912.0, dtype=np.float32).view(np.uint32))


def gather_low_bytes(a, b, c, d):
    return byte_perm(byte_perm(a, b, 0x0040), byte_perm(c, d, 0x0040), 0x5410)


@pytest.mark.parametrize("bits", [4, 8])
def test_unclamped_codes_pack_like_the_clamped_path(bits):
    """store_codes8_unclamped's words equal the packing of rni(v * inv) (element e at nibble / byte e) for every
    value a row that passes codes_need_no_clamp can hold, including the exact ties."""
    qmax = 7 if bits == 4 else 127
    gen = np.random.default_rng(bits)
    for trial in range(200):
        targets = gen.uniform(-qmax - 0.49, qmax + 0.49, 8)
        inv = np.float32(0.37)
        if trial < 20:  # exact ties (a power-of-two multiplier keeps v * inv a half-integer): round to even
            targets = np.clip(np.round(targets) + 0.5 * gen.choice([-1, 1], 8), -qmax + 0.5, qmax - 0.5)
            inv = np.float32(0.25)
        v = (targets / np.float64(inv)).astype(np.float32)
        if trial < 20:
            assert np.all(np.float64(v) * np.float64(inv) % 1 == 0.5)
        r = [code_bits(v[e], inv) for e in range(8)]
        codes = [int(np.rint(np.float64(v[e]) * np.float64(inv))) for e in range(8)]
        assert all(-qmax <= c <= qmax for c in codes)
        if bits == 4:
            even, odd = gather_low_bytes(r[0], r[2], r[4], r[6]), gather_low_bytes(r[1], r[3], r[5], r[7])
            word = (even & 0x0F0F0F0F) | ((odd << 4) & 0xF0F0F0F0)
            expected = sum((c & 0xF) << (4 * e) for e, c in enumerate(codes))
            assert word == expected
            pair = (r[0] & 0x0F) | ((r[1] << 4) & 0xF0)  # nibble_pair (the 14336 kernel)
            assert pair == (codes[0] & 0xF) | ((codes[1] & 0xF) << 4)
        else:
            lo, hi = gather_low_bytes(*r[:4]), gather_low_bytes(*r[4:])
            expected = sum((c & 0xFF) << (8 * e) for e, c in enumerate(codes))
            assert lo | (hi << 32) == expected
            assert byte_perm(r[0], r[1], 0x0040) & 0xFFFF == (codes[0] & 0xFF) | ((codes[1] & 0xFF) << 8)
