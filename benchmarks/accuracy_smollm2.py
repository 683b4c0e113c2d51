"""The README's accuracy table: SmolLM2-135M-Instruct, every method and precision, on the CPU.

Each row runs one ``quantkern quantize`` command (printed with the table, so any row can be
re-run alone) and reads back the perplexity it reports on GPL-3 (512-token windows) and the time
quantization took. Calibration text: the license texts in /usr/share/common-licenses outside the
GPL family (Apache-2.0, Artistic, BSD, CC0-1.0, GFDL-1.2, GFDL-1.3, MPL-1.1, MPL-2.0), so that no
calibration sentence also appears in the evaluation text. The fp32 row is the unquantized model.

    python benchmarks/accuracy_smollm2.py --out accuracy/            # every row (about an hour on 2 cores)
    python benchmarks/accuracy_smollm2.py --out accuracy/ --rows gptq awq

Results go to ``OUT/accuracy.json`` (with versions) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path


# name -> (config label, the anchor or RTN figure the project was given (its ANCHORS.md, outside this
#          repository), target, quantize flags)
ROWS = {
    "rtn": ("W4A16 g64, RTN (symmetric)", 34.59, None, ["--method", "rtn", "--group-size", "64"]),
    "gptq": ("W4A16 g64, GPTQ (asymmetric, act-order)", 34.59, 25.5,
             ["--method", "gptq", "--group-size", "64", "--asymmetric", "--option", "act_order=true"]),
    "awq": ("W4A16 g64, AWQ (asymmetric)", 34.59, 27.0,
            ["--method", "awq", "--group-size", "64", "--asymmetric", "--option", "search_windows=4"]),
    "rtn-w8a8": ("W8A8, RTN (per-channel, per-token)", 22.89, None,
                 ["--method", "rtn", "--bits", "8", "--acts-bits", "8", "--group-size", "-1"]),
    "smoothquant": ("W8A8, SmoothQuant", 22.89, 22.5, ["--method", "smoothquant"]),
    "quarot-w4a8": ("W4A8 per-channel, QuaRot + GPTQ", 45.26, 30.0,
                    ["--method", "quarot", "--group-size", "-1", "--acts-bits", "8"]),
    "quarot-w4a4kv4": ("W4A4 KV4 per-channel, QuaRot + GPTQ", 9558.0, 36.0,
                       ["--method", "quarot", "--group-size", "-1", "--acts-bits", "4", "--kv-bits", "4"]),
}


def fp32_perplexity() -> float:
    import torch

    from quantkern.builtin_model import load_builtin_model
    from quantkern.evaluation import perplexity

    model, tokenizer = load_builtin_model(dtype=torch.float32)
    return perplexity(model, tokenizer, progress=False)


def run_row(name: str, out: Path, calib: Path, samples: int) -> dict:
    label, before, target, flags = ROWS[name]
    command = ["quantkern", "quantize", *flags, "--dst", str(out / name), "--overwrite"]
    if name not in ("rtn", "rtn-w8a8"):
        command += ["--calib", str(calib), "--calib-samples", str(samples)]
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "quantkern", *command[1:]], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return {"row": name, "config": label, "command": " ".join(command), "error": result.stderr[-500:]}
    ppl = float(re.search(r"perplexity on .*: ([0-9.]+)", result.stdout).group(1))
    quantize_s = float(re.search(r"quantization took ([0-9.]+) s", result.stdout).group(1))
    size = float(re.search(r"\(([0-9.]+) MiB on disk", result.stdout).group(1))
    return {"row": name, "config": label, "perplexity": ppl, "before": before, "target": target,
            "quantize_s": quantize_s, "wall_s": round(wall, 1), "disk_mib": size, "command": " ".join(command)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for checkpoints and accuracy.json")
    parser.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--samples", type=int, default=128, help="calibration windows of 512 tokens (default 128)")
    parser.add_argument("--no-fp32", action="store_true", help="skip the fp32 row")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from quantkern.calibration import LICENSE_CALIBRATION_SOURCES, write_license_calibration_text

    calib = write_license_calibration_text(args.out / "license-calibration.txt")

    import torch

    import quantkern

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import commit_info

    commit, dirty = commit_info()  # (the figures belong to a commit: QUANTKERN_COMMIT, else git's HEAD)
    rows = []
    if not args.no_fp32:
        rows.append({"row": "fp32", "config": "fp32", "perplexity": fp32_perplexity()})
    for name in args.rows:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.append(run_row(name, args.out, calib, args.samples))
        (args.out / "accuracy.json").write_text(json.dumps({
            "rows": rows,
            "calibration": {"file": str(calib), "sources": LICENSE_CALIBRATION_SOURCES, "samples": args.samples},
            "quantkern": quantkern.__version__, "commit": commit, "dirty": dirty, "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine()}, indent=2))

    print("| config | perplexity | before (RTN, anchor figures) | target | quantize time | disk |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        if "error" in row:
            print(f"| {row['config']} | failed: {row['error'][-120:]!r} | | | | |")
            continue
        target = f"<= {row['target']}" if row.get("target") else ""
        before = f"{row['before']:,}" if row.get("before") else ""
        time_s = f"{row['quantize_s']:.0f} s" if "quantize_s" in row else ""
        disk = f"{row['disk_mib']:.1f} MiB" if "disk_mib" in row else ""
        print(f"| {row['config']} | {row['perplexity']:.2f} | {before} | {target} | {time_s} | {disk} |")
    print("\nCommands (calibration file written by this script):")
    for row in rows:
        if "command" in row:
            print(f"  {row['row']}: {row['command']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
