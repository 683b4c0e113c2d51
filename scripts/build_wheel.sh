#!/usr/bin/env bash
# Build a binary wheel of quantkern for one GPU family, tied to the torch of this environment, and check it.
#
#   scripts/build_wheel.sh                        # the RTX 4090 (sm_89):
#                                                 #   dist/quantkern-0.1.0+cu130.torch2.14.sm89-cp311-cp311-linux_x86_64.whl
#   ARCHS="8.9;9.0a" scripts/build_wheel.sh       # the RTX 4090 and the H100/H200 in one wheel
#
# Environment: PYTHON (default python3; its torch is the one the wheel is built against and then requires),
# ARCHS (TORCH_CUDA_ARCH_LIST, default 8.9), MAX_JOBS (default: all cores), CUDA_HOME (default /usr/local/cuda),
# DIST (where the wheel goes, default dist/).
#
# The extension calls torch's C++ API, so the wheel is for one torch minor version (its metadata requires
# torch==X.Y.*) and one CUDA major version; the version's local label says which (setup.py, torch_pinned_wheel).
# The same linux_x86_64 wheel serves Linux and WSL2 (docs/BUILD.md). Before the wheel lands in DIST it is checked
# from an unpacked copy, without installing it: its extension loads against this torch and reports the arch list
# asked for, its machine code is for exactly those archs (cuobjdump), and its metadata pins this torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARCHS=${ARCHS:-8.9}
DIST=${DIST:-dist}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=$ARCHS QUANTKERN_WHEEL_PIN_TORCH=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
start=$SECONDS
echo "build_wheel: archs $ARCHS, $($PY -c 'import torch; print("torch", torch.__version__)'), MAX_JOBS=$MAX_JOBS"
# (setup.py writes build/ and quantkern.egg-info/, both git-ignored; a stale build/ is reused by setuptools.)
$PY -m pip wheel --no-build-isolation --no-deps --wheel-dir "$work" . > "$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log"; echo "build_wheel: the build failed (log above)"; exit 1; }
wheel=$(ls "$work"/quantkern-*.whl)
echo "build_wheel: built $(basename "$wheel") in $((SECONDS - start)) s"

cuobjdump=$CUDA_HOME/bin/cuobjdump
if [ ! -x "$cuobjdump" ]; then  # a bare toolkit may lack it; Triton's wheel carries one
    cuobjdump=$($PY -c 'import os, triton; print(os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"))')
fi
(cd "$work" && $PY - "$wheel" "$ARCHS" "$cuobjdump") <<'CHECK'
import subprocess, sys, zipfile
wheel, archs, cuobjdump = sys.argv[1:]
unpacked = "unpacked"
with zipfile.ZipFile(wheel) as zf:
    zf.extractall(unpacked)
    names = zf.namelist()
    metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
import torch
torch_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])
requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist: torch")]
assert requires == [f"torch=={torch_minor}.*"], f"the wheel must require this torch's minor version, got {requires}"
[extension] = [n for n in names if n.startswith("quantkern/_C") and n.endswith(".so")]
probe = ("import quantkern, quantkern._C as C; assert quantkern.__file__.startswith(%r), quantkern.__file__; "
         "print(C.build_info()['archs'])" % __import__("os").path.abspath(unpacked))
loaded = subprocess.run([sys.executable, "-c", probe], env={**__import__("os").environ, "PYTHONPATH": unpacked},
                        capture_output=True, text=True)
assert loaded.returncode == 0, "the wheel's extension does not load against this torch:\n" + loaded.stderr
assert loaded.stdout.strip() == archs, f"the extension reports archs {loaded.stdout.strip()!r}, not {archs!r}"
def listed(flag, suffix):  # cuobjdump names each embedded file like "_C.1.sm_89.cubin" / "_C.1.sm_89.ptx"
    out = subprocess.run([cuobjdump, flag, f"{unpacked}/{extension}"], capture_output=True, text=True, check=True)
    return {word.split(".")[-2].replace("compute_", "sm_") for word in out.stdout.split() if word.endswith(suffix)}
entries = [a.strip() for a in archs.replace(",", ";").replace(" ", ";").split(";") if a.strip()]
want_sass = {"sm_" + a.split("+")[0].replace(".", "") for a in entries}
want_ptx = {"sm_" + a.split("+")[0].replace(".", "") for a in entries if a.upper().endswith("+PTX")}
sass, ptx = listed("--list-elf", ".cubin"), listed("--list-ptx", ".ptx")
assert sass == want_sass, f"machine code for {sorted(sass)}, asked for {sorted(want_sass)}"
assert ptx == want_ptx, f"PTX for {sorted(ptx)}, asked for {sorted(want_ptx)}"
print(f"build_wheel: checked: loads against torch {torch.__version__}, archs {archs}, machine code "
      f"{' '.join(sorted(sass))}{', PTX ' + ' '.join(sorted(ptx)) if ptx else ''}, requires {requires[0]}")
CHECK
mkdir -p "$DIST"
mv "$wheel" "$DIST/"
echo "build_wheel: $DIST/$(basename "$wheel") ($(du -h "$DIST/$(basename "$wheel")" | cut -f1))"
