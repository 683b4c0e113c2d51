# CPU emulation of csrc/int_small_m.cu's fragment construction (which weight and activation bytes each lane feeds
# to each mma.m16n8k32 step) on the real tiled layouts, checked against reference.int_matmul. Run:
#   python scripts/emulate_int_small_m.py
import numpy as np, torch
from quantkern import reference
from quantkern.format import pack_int4_signed
from quantkern.layout_int import permute_w4a8, tile_int_weight

def word(buf, off):  # 4 bytes little-endian -> uint32
    return int.from_bytes(bytes(buf[off:off + 4]), "little")

def to_i8x4(u):
    return np.frombuffer(int(u).to_bytes(4, "little"), dtype=np.int8).astype(np.int64)

def byte_perm(x, y, selector):  # CUDA's __byte_perm: result byte n = byte (selector >> 4n) & 7 of {y:x}
    src = int(x).to_bytes(4, "little") + int(y).to_bytes(4, "little")
    return int.from_bytes(bytes(src[(selector >> (4 * n)) & 7] for n in range(4)), "little")

def widen_half(w, half):  # the kernel's widen_half: 4 packed codes of halfword `half` -> 4 int8 lanes, 16 x code
    return byte_perm(w, (w << 4) & 0xFFFFFFFF, 0x1504 if half == 0 else 0x3726) & 0xF0F0F0F0

def run(wbits, M, K, N, abits=8):  # abits 4: packed int4 activation codes (W4A4)
    a_range = (-128, 128) if abits == 8 else (-8, 8)
    a = torch.randint(*a_range, (M, K), dtype=torch.int8)
    lo, hi = (-128, 128) if wbits == 8 else (-8, 8)
    w = torch.randint(lo, hi, (N, K), dtype=torch.int8)
    wq = permute_w4a8(w) if wbits == 4 else w
    tiled = tile_int_weight(wq if wbits == 8 else pack_int4_signed(wq), wbits).numpy().view(np.uint8)
    k_tiles = tiled.shape[1]
    A = (a if abits == 8 else pack_int4_signed(a)).numpy().view(np.uint8)
    Kp = k_tiles * 128 * abits // 8  # bytes of a padded activation row
    Apad = np.zeros((16, Kp), np.uint8); Apad[:M, :A.shape[1]] = A
    out = np.zeros((M, N), np.int64)
    shift = (4 if wbits == 4 else 0) + (4 if abits == 4 else 0)
    warps = 3  # a block's warps deal its k-tiles round-robin (any count gives the same int32 sums)
    for b in range((N + 31) // 32):  # 32-channel blocks: rows 32 * (b % 2) .. + 31 of unit b // 2
        unit, half = b // 2, b % 2
        for s in range(2):
            acc = np.zeros((16, 16), np.int64)  # [channel 16][token 16], the block's tile
            for warp in range(warps):
                for kt in range(warp, k_tiles, warps):
                    for step in range(4):
                        Afr = np.zeros((16, 32), np.int64); Bfr = np.zeros((32, 16), np.int64)
                        for lane in range(32):
                            g, t = lane >> 2, lane & 3
                            regs = []
                            for r in range(2):
                                row = tiled[unit, kt, 32 * half + 16 * s + g + 8 * r]
                                if wbits == 4:
                                    wd = word(row, 16 * t + 4 * step)
                                    regs.append(((wd << 4) & 0xF0F0F0F0, wd & 0xF0F0F0F0))
                                else:
                                    base = 64 * (step // 2) + 16 * t + 8 * (step % 2)
                                    regs.append((word(row, base), word(row, base + 4)))
                            Afr[g, 4*t:4*t+4] = to_i8x4(regs[0][0]); Afr[g+8, 4*t:4*t+4] = to_i8x4(regs[1][0])
                            Afr[g, 16+4*t:16+4*t+4] = to_i8x4(regs[0][1]); Afr[g+8, 16+4*t:16+4*t+4] = to_i8x4(regs[1][1])
                            for tt in range(2):
                                xr = Apad[8 * tt + g, kt * 16 * abits:(kt + 1) * 16 * abits]
                                if abits == 4:  # lane t's 16 bytes: k 32t..32t+31, two codes a byte
                                    lo = word(xr, 16 * t + 4 * (step // 2))
                                    hi = word(xr, 16 * t + 8 + 4 * (step // 2))
                                    b0, b1 = widen_half(lo, step % 2), widen_half(hi, step % 2)
                                elif wbits == 4:
                                    p0, p1 = 32 * t, 32 * t + 16
                                    b0, b1 = word(xr, p0 + 4 * step), word(xr, p1 + 4 * step)
                                else:
                                    p = 16 * t + 64 * (step // 2)
                                    b0, b1 = word(xr, p + 8 * (step % 2)), word(xr, p + 8 * (step % 2) + 4)
                                Bfr[4*t:4*t+4, 8*tt+g] = to_i8x4(b0); Bfr[16+4*t:16+4*t+4, 8*tt+g] = to_i8x4(b1)
                        acc += Afr @ Bfr
            n0 = 32 * b + 16 * s
            for c in range(16):
                if n0 + c < N:
                    out[:, n0 + c] = acc[c, :M] >> shift
    ref = reference.int_matmul(a, w).numpy()
    print(f"W{wbits}A{abits}", M, K, N, "exact" if np.array_equal(out, ref) else "MISMATCH")
    return np.array_equal(out, ref)

# (a mismatch exits 1: it printed MISMATCH and exited 0 before)
ok = [run(4, 5, 160, 72), run(8, 5, 160, 72), run(4, 16, 256, 200), run(8, 9, 384, 136),
      run(4, 5, 160, 72, abits=4), run(4, 16, 256, 200, abits=4)]
raise SystemExit(0 if all(ok) else 1)
