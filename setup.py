"""Build script for quantkern: the Python package plus the CUDA extension ``quantkern._C``.

Install with the torch already in the environment (the extension must be built against it):

    pip install --no-build-isolation -e .        # development
    pip install --no-build-isolation .           # regular install

The extension is skipped (the package still installs, pure Python) when QUANTKERN_SKIP_CUDA=1,
when torch is a CPU-only build, or when no CUDA toolkit (nvcc) is found. See docs/BUILD.md for
the environment variables (TORCH_CUDA_ARCH_LIST, QUANTKERN_PTXAS_VERBOSE, MAX_JOBS, CUDA_HOME).
"""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext as _setuptools_build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
EXT_NAME = "quantkern._C"
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0a"
EXT_SOURCES = ["csrc/bindings.cpp", "csrc/activation_quant.cu", "csrc/w4a16_gemm.cu", "csrc/w4a16_small_m.cu", "csrc/w4a16_wgmma.cu", "csrc/int_gemm.cu", "csrc/int_wgmma.cu", "csrc/int_small_m.cu",
               "csrc/hadamard.cu", "csrc/permute.cu",
               "csrc/hadamard_paley1.cu", "csrc/hadamard_paley2.cu", "csrc/hadamard_mma.cu",
               "csrc/block_rotation.cu"]  # paths relative to setup.py


def log(msg: str) -> None:
    print(f"quantkern setup: {msg}", file=sys.stderr, flush=True)


def banner(lines) -> None:
    bar = "=" * 78
    print("\n".join([bar] + [f"quantkern: {line}" for line in lines] + [bar]), file=sys.stderr, flush=True)


def read_version() -> str:
    text = (ROOT / "quantkern" / "version.py").read_text()
    match = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", text, re.M)
    if not match:
        raise RuntimeError("quantkern/version.py must define __version__ = \"X.Y.Z\"")
    return match.group(1)


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ---------------------------------------------------------------------------------------------
# Decide whether to build the CUDA extension
# ---------------------------------------------------------------------------------------------

class _TorchMissingBuildExt(_setuptools_build_ext):
    """Used when torch cannot be imported at build time: fail at build_ext with a clear message.

    (Metadata-only steps such as egg_info and sdist still work without torch.)
    """

    def run(self):
        raise RuntimeError(
            "quantkern: torch is not importable in the build environment, so the CUDA extension "
            "quantkern._C cannot be built against it. Install torch first and build with "
            "`pip install --no-build-isolation ...` (pip's default isolated build environment has no "
            "torch), or set QUANTKERN_SKIP_CUDA=1 to install the pure-Python package without the extension.")


def cuda_extension_config():
    """(ext_modules, cmdclass) for setup()."""
    if env_flag("QUANTKERN_SKIP_CUDA"):
        return skip("QUANTKERN_SKIP_CUDA=1 is set")

    # /usr/local/bin/nvcc may be a wrapper script, from which torch would guess CUDA_HOME=/usr/local.
    # Must happen before torch.utils.cpp_extension is imported (it reads CUDA_HOME at import time).
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") \
            and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

    try:
        import torch
    except ImportError as error:
        log(f"cannot import torch ({error}); building the extension will fail with instructions")
        from setuptools import Extension
        return [Extension(EXT_NAME, sources=EXT_SOURCES)], {"build_ext": _TorchMissingBuildExt}

    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")

    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        return skip(f"no CUDA toolkit found (CUDA_HOME={cuda_home!r}, no bin/nvcc there); "
                    "set CUDA_HOME to the toolkit root to build the extension")

    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        archs = DEFAULT_CUDA_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch reads it to make the -gencode flags
    archs_define = archs.replace('"', "")

    # No -std here: torch's BuildExtension adds the standard its headers need (C++20 from torch 2.14 on,
    # whose c10 headers use operator<=>; C++17 for older torch, e.g. 2.11 on the GPU machines).
    cxx_flags = ["-O3", f'-DQUANTKERN_CUDA_ARCHS="{archs_define}"']
    # No --use_fast_math: the kernels need IEEE division / rounding for bit-exact results.
    nvcc_flags = ["-O3", "-lineinfo", f'-DQUANTKERN_CUDA_ARCHS="{archs_define}"']
    if env_flag("QUANTKERN_PTXAS_VERBOSE"):
        nvcc_flags += ["-Xptxas", "-v"]  # register / spill report per kernel and arch

    if not cpp_extension.is_ninja_available():
        log("ninja not found: falling back to the slow serial distutils build (pip install ninja)")

    global BUILT_AGAINST
    BUILT_AGAINST = (torch.__version__, torch.version.cuda, archs_define)
    log(f"building {EXT_NAME} with torch {torch.__version__} (CUDA {torch.version.cuda}), "
        f"CUDA_HOME={cuda_home}, TORCH_CUDA_ARCH_LIST={archs}, MAX_JOBS={os.environ.get('MAX_JOBS', '(all cores)')}")
    ext = cpp_extension.CUDAExtension(
        name=EXT_NAME,
        sources=EXT_SOURCES,
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=shared_libstdcxx_link_args(),
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


def shared_libstdcxx_link_args():
    """Extra link arguments that keep libstdc++ a shared library ([] when the toolchain does that itself).

    Some toolchains find only libstdc++.a (e.g. a relocated gcc whose libstdc++.so symlink dangles: the GPU
    machines' /opt/gcc). The extension then carries a private copy of the C++ runtime, and any C++ exception
    crossing into torch's libraries (every failed TORCH_CHECK) crashes with a segfault. In that case link the
    libstdc++.so.6 that torch itself loaded into this process.
    """
    if not sys.platform.startswith("linux"):
        return []
    cxx = os.environ.get("CXX") or "c++"
    try:
        found = subprocess.run(shlex.split(cxx) + ["-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return []
    if os.path.isabs(found) and os.path.exists(found):
        return []
    try:
        with open("/proc/self/maps") as maps:
            loaded = [line.split()[-1] for line in maps if "/libstdc++.so" in line]
    except OSError:
        loaded = []
    if not loaded:
        log(f"warning: {cxx} finds no shared libstdc++ and none is loaded here; the extension may link "
            "libstdc++ statically, which makes C++ exceptions (failed TORCH_CHECKs) crash")
        return []
    log(f"{cxx} finds no shared libstdc++ (-print-file-name=libstdc++.so gives {found!r}), so it would link "
        f"libstdc++.a and C++ exceptions would crash across torch's libraries; linking {loaded[0]} instead")
    return [loaded[0]]


# (torch version, CUDA version, arch list) the extension is built against; None when it is not built.
BUILT_AGAINST = None


def torch_pinned_wheel(version: str, requires: list):
    """(version, requires) of a binary wheel tied to the torch it was built against (QUANTKERN_WHEEL_PIN_TORCH=1,
    set by scripts/build_wheel.sh): the extension calls torch's C++ API, whose symbols change between torch minor
    versions, so the wheel requires torch==X.Y.* and names its build in the version's local label, e.g.
    0.1.0+cu130.torch2.14.sm89 (CUDA 13.0, torch 2.14, sm_89 machine code)."""
    if BUILT_AGAINST is None:
        raise SystemExit("quantkern setup: QUANTKERN_WHEEL_PIN_TORCH=1 asks for a binary wheel, but the CUDA "
                         "extension is not being built (see the reason above)")
    torch_version, cuda_version, archs = BUILT_AGAINST
    torch_minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    arch_tags = ["sm" + arch.lower().replace(".", "").replace("+", "")
                 for arch in archs.replace(",", ";").replace(" ", ";").split(";") if arch]
    label = ".".join([f"cu{cuda_version.replace('.', '')}", f"torch{torch_minor}"] + arch_tags)
    requires = [f"torch=={torch_minor}.*" if r.startswith("torch") else r for r in requires]
    return f"{version}+{label}", requires


def skip(reason: str):
    banner([
        "building WITHOUT the CUDA extension quantkern._C",
        f"reason: {reason}",
        "the pure-Python package (reference and Triton backends) is installed; see docs/BUILD.md",
    ])
    return [], {}


ext_modules, cmdclass = cuda_extension_config()

# `triton_kernels/` at the top of the repo ships as `quantkern.triton_kernels` (never as a top-level
# `triton_kernels`, which would shadow Triton's own package of that name).
packages = find_packages(include=["quantkern", "quantkern.*"])
packages += ["quantkern.triton_kernels"] + [
    f"quantkern.triton_kernels.{sub}" for sub in find_packages(where=str(ROOT / "triton_kernels"))]

readme = ROOT / "README.md"
version = read_version()
install_requires = [
    "torch>=2.4",
    "numpy",
    "safetensors",
    "transformers",
    "tqdm",
    "gguf",
    "accelerate",
]
if env_flag("QUANTKERN_WHEEL_PIN_TORCH"):
    version, install_requires = torch_pinned_wheel(version, install_requires)
    log(f"binary wheel {version}, requiring {install_requires[0]}")

setup(
    name="quantkern",
    version=version,
    description="Custom GPU kernels (CUDA and Triton) for low-bit LLM inference",
    long_description=readme.read_text() if readme.exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"quantkern.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=install_requires,
    extras_require={"dev": ["pytest", "pytest-benchmark"]},
    entry_points={"console_scripts": ["quantkern = quantkern.cli:main"]},
    zip_safe=False,
)
