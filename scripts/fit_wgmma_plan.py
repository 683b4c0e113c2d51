"""Fit the W4A16 wgmma kernel's launch-plan cost model (csrc/w4a16_gemm.cu: modelled_wgmma_us, its kModel*
coefficients) to timings of forced plans from scripts/probe_w4a16.py, and show how its picks compare with the best
plan measured.

    python scripts/probe_w4a16.py --cuda-graph --variants 0:0,3:1,3:2,3:4,4:1,4:2,4:3,5:1,5:2 \\
        --batches 512,1024,2048 --shapes 896x4864,4864x896,1024x3072,3072x1024,1536x576 > plans.txt
    python scripts/fit_wgmma_plan.py plans.txt [more.txt ...] [--sm-count 132]

The model, as in the kernel's host code for fp16 (two blocks per SM at 64 and 128 tokens, one at 256): the busiest
SM's time is a fixed launch cost, plus the k-tiles (of 64 tokens) of its blocks at a rate by tile size and by whether
a block has its SM alone, plus for a split the megabytes of fp32 partials (written and read back) and the last
block's sum per split. The committed fit: docs/results/h100_probe_w4a16_plans_3ad4a7c.txt (tests/test_wgmma_plan_fit.py
checks that csrc's coefficients are its fit).
"""
import argparse
import math
import re
from collections import defaultdict

import numpy as np

TOKENS = {3: 64, 4: 128, 5: 256}  # probe_w4a16's tile_m of the wgmma kernel -> tokens per tile
# The coefficients' names in csrc/w4a16_gemm.cu, in the order of features() after the fixed cost.
COEFFICIENTS = ("kModelAlone64", "kModelShared64", "kModelAlone128", "kModelShared128", "kModelTile256",
                "kModelPartialMB", "kModelSplitSum")
K_TILE = 64      # kBK
CHANNELS = 128   # kWgmmaChannels
ROW = re.compile(r"(\d+)x(\d+) M=(\d+) cublas [\d.]+us \| (.*)")
CELL = re.compile(r"(\d+):(\d+):([\d.]+)us")


def read_timings(paths):
    """{(K, N, M): {(tile_m, split_k): us}} of the forced wgmma plans in probe_w4a16's rows (a row printed twice,
    as the probe does, counts once)."""
    timings = defaultdict(dict)
    for path in paths:
        with open(path) as f:
            for line in f:
                row = ROW.match(line)
                if not row:
                    continue
                k, n, m = map(int, row.groups()[:3])
                for cell in row.group(4).split(" | "):
                    c = CELL.match(cell)
                    if c and int(c.group(1)) in TOKENS and int(c.group(2)) > 0:
                        timings[(k, n, m)][(int(c.group(1)), int(c.group(2)))] = float(c.group(3))
    return dict(timings)


def features(k, n, m, tokens, splits, sm_count):
    """The model's terms for one plan: [1 (fixed cost), then one column per coefficient of COEFFICIENTS]."""
    k_tiles = k // K_TILE
    per_split = math.ceil(k_tiles / splits)
    used_splits = math.ceil(k_tiles / per_split)  # no empty split
    blocks = math.ceil(n / CHANNELS) * math.ceil(m / tokens) * used_splits
    busiest = math.ceil(blocks / sm_count)
    work = per_split * tokens / 64
    compute = [0.0] * 5
    if tokens == 256:
        compute[4] = work * busiest
    else:
        column = 0 if tokens == 64 else 2
        compute[column if busiest == 1 else column + 1] = work * busiest
    partial_mb = 2 * used_splits * m * n * 4 / 1e6 if used_splits > 1 else 0.0
    split_sums = used_splits * tokens / 64 if used_splits > 1 else 0.0
    return [1.0] + compute + [partial_mb, split_sums]


def fit(timings, sm_count):
    """Least squares: (fixed cost, coefficients in the order of COEFFICIENTS), us."""
    x, y = [], []
    for (k, n, m), plans in timings.items():
        for (tile_m, splits), us in plans.items():
            x.append(features(k, n, m, TOKENS[tile_m], splits, sm_count))
            y.append(us)
    solution, *_ = np.linalg.lstsq(np.array(x), np.array(y), rcond=None)
    return float(solution[0]), [float(c) for c in solution[1:]]


def predict(k, n, m, tile_m, splits, fixed, coefficients, sm_count):
    return float(np.dot(features(k, n, m, TOKENS[tile_m], splits, sm_count), [fixed] + list(coefficients)))


def pick(point, plans, fixed, coefficients, sm_count):
    """The measured plan the model predicts fastest."""
    return min(plans, key=lambda plan: predict(*point, *plan, fixed, coefficients, sm_count))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="scripts/probe_w4a16.py output with forced wgmma plans")
    parser.add_argument("--sm-count", type=int, default=132, help="the GPU's SMs (H100 SXM: 132)")
    args = parser.parse_args()
    timings = read_timings(args.logs)
    fixed, coefficients = fit(timings, args.sm_count)
    errors = [abs(predict(*point, *plan, fixed, coefficients, args.sm_count) - us) / us
              for point, plans in timings.items() for plan, us in plans.items()]
    print(f"{sum(len(p) for p in timings.values())} timings, {len(timings)} points; fixed cost {fixed:.3f} us, "
          f"median relative error {np.median(errors):.3f}")
    for name, value in zip(COEFFICIENTS, coefficients):
        print(f"  constexpr double {name} = {value:.3f};")
    # Fitted without each shape in turn, the model's pick at that shape's points against the best measured.
    print("\nleave one shape out: K x N, M, best measured (tile_m:split_k us), the model's pick")
    total_best = total_pick = 0.0
    for shape in sorted({(k, n) for k, n, _ in timings}):
        others = {point: plans for point, plans in timings.items() if point[:2] != shape}
        fixed_o, coefficients_o = fit(others, args.sm_count)
        for point in sorted(p for p in timings if p[:2] == shape):
            plans = timings[point]
            best = min(plans, key=plans.get)
            chosen = pick(point, plans, fixed_o, coefficients_o, args.sm_count)
            total_best += plans[best]
            total_pick += plans[chosen]
            print(f"  {point[0]} x {point[1]}, M = {point[2]}: {best[0]}:{best[1]} {plans[best]:.1f}, "
                  f"{chosen[0]}:{chosen[1]} {plans[chosen]:.1f}")
    print(f"  in total: the picks {total_pick:.1f} us against the best {total_best:.1f} "
          f"({total_pick / total_best - 1:+.1%})")


if __name__ == "__main__":
    main()
