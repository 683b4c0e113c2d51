"""Which kernel backends are present, and which one runs an op.

Three backends, in order of preference on a CUDA tensor:
  ``cuda``      the compiled extension ``quantkern._C`` (ops registered with TORCH_LIBRARY)
  ``triton``    ``quantkern.triton_kernels`` (on CPU tensors only under ``TRITON_INTERPRET=1``)
  ``reference`` plain PyTorch (``quantkern.reference``): the default on CPU tensors, and on CUDA
                tensors only when asked for, by argument or ``QUANTKERN_BACKEND=reference``.

A CUDA tensor whose op has no fast kernel raises ``MissingKernelError``: quantkern never silently
dequantizes and multiplies in fp16 on a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

ENV_BACKEND = "QUANTKERN_BACKEND"
BACKENDS = ("cuda", "triton", "reference")

# Every public op and the backends that can implement it (one place for the list of ops).
OPS = (
    "quantize_per_token",
    "weight_only_linear",
    "w8a8_linear",
    "w4a4_linear",
    "w4a8_linear",
    "hadamard",
    "hadamard_quantize",
    "block_rotate",
    "block_rotate_quantize",
    "quantize_kv",
    "permute_columns",
)


# Each public op and the extension op (torch.ops.quantkern.*) that implements it on CUDA.
EXTENSION_OPS = {
    "quantize_per_token": "quantize_per_token",
    "weight_only_linear": "w4a16_gemm",
    "hadamard": "hadamard",
    "hadamard_quantize": "hadamard_quantize",
    "w8a8_linear": "int_gemm",
    "w4a4_linear": "int_gemm",
    "w4a8_linear": "int_gemm",
    "permute_columns": "permute_columns",
    "block_rotate_quantize": "block_rotate_quantize",
}


class MissingKernelError(RuntimeError):
    """An op was asked to run on a device/backend for which no kernel is available."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is missing, or what it is
    kernels: frozenset


def _load_cuda_extension() -> BackendStatus:
    if os.environ.get("QUANTKERN_DISABLE_CUDA_EXTENSION") == "1":
        return BackendStatus("cuda", False, "disabled by QUANTKERN_DISABLE_CUDA_EXTENSION=1", frozenset())
    try:
        from . import _C  # noqa: F401  (loading it registers the torch.ops.quantkern.* ops)
    except ImportError as error:
        return BackendStatus("cuda", False, _extension_import_problem(error), frozenset())
    from ._fake import register_extension_fakes

    register_extension_fakes()  # so torch.compile can trace the extension's ops

    info = _C.build_info()
    where = "" if torch.cuda.is_available() else "; no CUDA device visible, so its kernels cannot run here"
    return BackendStatus(
        "cuda", True,
        f"quantkern._C built for archs {info['archs']} with CUDA {info['cuda_version']}, torch {info['torch_version']}{where}",
        frozenset(op for op, ext_op in EXTENSION_OPS.items() if ext_op in info["kernels"]))


def _extension_import_problem(error: ImportError) -> str:
    """Why ``import quantkern._C`` failed, and what to do: the file is absent (not built), or present but not
    loadable (usually built against another torch: its C++ symbols differ between torch versions)."""
    import importlib.util

    try:
        present = importlib.util.find_spec("quantkern._C") is not None
    except (ImportError, ValueError):
        present = False
    if present:
        return (f"quantkern._C is present but cannot be loaded ({error}). An extension (or wheel) built against "
                f"another torch than this one ({torch.__version__}) does this: rebuild it here, or install the wheel "
                "made for this torch (see docs/BUILD.md)")
    return (f"quantkern._C is not built ({error}). Build it with a CUDA build of torch and the CUDA toolkit: "
            "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e . (see docs/BUILD.md)")


def cuda_build_info() -> dict:
    """How the CUDA extension was built (``quantkern._C.build_info()``); {} where it is absent."""
    if not status("cuda").available:
        return {}
    from . import _C

    return _C.build_info()


def arch_list_runs_on(archs: str, capability: tuple) -> bool:
    """Whether an extension built for ``archs`` (TORCH_CUDA_ARCH_LIST's form: "8.9;9.0a", "8.6+PTX") holds code that
    runs on a GPU of compute capability ``capability`` (major, minor).

    Machine code runs on GPUs of its major version and the same or a higher minor one (sm_86 code on an sm_89 GPU);
    an arch-specific target ("9.0a": wgmma) only on its own version; PTX ("+PTX") is compiled by the driver for its
    version or any later one. An entry that is not a version number (an arch name, or "unknown" from a build that did
    not record its list) cannot be judged, and counts as runnable.
    """
    major, minor = capability
    for entry in archs.replace(",", ";").replace(" ", ";").split(";"):
        entry = entry.strip()
        if not entry:
            continue
        version, _, suffix = entry.partition("+")
        arch_specific = version.endswith("a")
        try:
            built_major, built_minor = (int(part) for part in version.rstrip("a").split("."))
        except ValueError:
            return True
        if suffix.upper() == "PTX" and not arch_specific and (built_major, built_minor) <= (major, minor):
            return True
        if built_major == major and (built_minor == minor if arch_specific else built_minor <= minor):
            return True
    return False


_DEVICE_MISMATCH: dict = {}


def cuda_device_mismatch(device: torch.device) -> Optional[str]:
    """None if the built extension has code for ``device``'s GPU, else why not (its archs against the GPU's)."""
    if not torch.cuda.is_available():
        return None  # no GPU to judge (and no CUDA tensor to run on)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_MISMATCH:
        if torch.compiler.is_compiling():
            # Not traced (build_info is a pybind11 call: a graph break under fullgraph); the model's weights were
            # prepared eagerly on this device, which made this check there.
            return None
        archs = cuda_build_info().get("archs", "unknown")
        major, minor = torch.cuda.get_device_capability(index)
        wanted = "9.0a" if (major, minor) == (9, 0) else f"{major}.{minor}"  # 9.0a: Hopper's wgmma kernels too
        _DEVICE_MISMATCH[index] = None if arch_list_runs_on(archs, (major, minor)) else (
            f"quantkern._C was built for archs {archs}, none of which runs on {torch.cuda.get_device_name(index)} "
            f"(sm_{major}{minor}); rebuild it with TORCH_CUDA_ARCH_LIST={wanted} (docs/BUILD.md)")
    return _DEVICE_MISMATCH[index]


def _load_triton() -> BackendStatus:
    try:
        import triton
    except ImportError as error:
        return BackendStatus("triton", False, f"triton is not installed ({error})", frozenset())
    from .triton_kernels import KERNELS

    if torch.cuda.is_available():
        reason = f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    elif triton_interpreting():
        reason = f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU interpreter: for tests, slow)"
    else:
        reason = f"triton {triton.__version__} installed, but no CUDA device (set TRITON_INTERPRET=1 to interpret on CPU)"
    return BackendStatus("triton", True, reason, frozenset(KERNELS))


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_STATUS: dict = {}


def check_backend_name(name: str, allow_auto: bool = True) -> str:
    """``name`` if it names a backend (or "auto", where allowed), else a ValueError listing them."""
    if name in BACKENDS or (allow_auto and name == "auto"):
        return name
    raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}" + (" or 'auto'" if allow_auto else ""))


def status(name: str) -> BackendStatus:
    """The backend's status, computed once per process."""
    if name not in _STATUS:
        check_backend_name(name, allow_auto=False)
        if name == "cuda":
            _STATUS[name] = _load_cuda_extension()
        elif name == "triton":
            _STATUS[name] = _load_triton()
        else:
            _STATUS[name] = BackendStatus("reference", True, "plain PyTorch (quantkern.reference)", frozenset(OPS))
    return _STATUS[name]


def _can_run(name: str, op: str, device: torch.device) -> Optional[str]:
    """None if backend ``name`` can run ``op`` on ``device``, else the reason it cannot."""
    st = status(name)
    if not st.available:
        return st.reason
    if op not in st.kernels:
        return f"the {name} backend has no kernel for {op}"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got a tensor on {device}"
    if name == "cuda":
        mismatch = cuda_device_mismatch(device)
        if mismatch:
            return mismatch
    if name == "triton" and device.type != "cuda" and not triton_interpreting():
        return f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got a tensor on {device}"
    return None


def requested_backend(backend: Optional[str] = None) -> str:
    """The backend asked for: ``backend`` (argument), else ``QUANTKERN_BACKEND`` (environment), else "auto"."""
    return check_backend_name(backend or os.environ.get(ENV_BACKEND) or "auto")


def select(op: str, device: torch.device, backend: Optional[str] = None) -> str:
    """The backend that runs ``op`` for tensors on ``device``.

    ``backend`` (argument) overrides ``QUANTKERN_BACKEND`` (environment), which overrides the
    automatic choice: cuda, then triton, for CUDA tensors; reference for CPU tensors.
    """
    requested = requested_backend(backend)
    if requested != "auto":
        reason = _can_run(requested, op, device)
        if reason:
            raise MissingKernelError(f"{op}: backend {requested!r} cannot run: {reason}")
        return requested
    if device.type != "cuda":
        return "reference"
    reasons = []
    for name in ("cuda", "triton"):
        reason = _can_run(name, op, device)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    raise MissingKernelError(
        f"no GPU kernel for {op} on {device} ({'; '.join(reasons)}). quantkern does not fall back to "
        f"dequantize-and-fp16 on a GPU; build the CUDA extension, or pass backend='reference' "
        f"(or set {ENV_BACKEND}=reference) to run the slow plain-PyTorch path on purpose.")


def report() -> list:
    """Rows (op, backend, state) for ``quantkern info``."""
    rows = []
    for op in OPS:
        for name in BACKENDS:
            st = status(name)
            if not st.available:
                state = "missing: backend unavailable"
            elif op in st.kernels:
                state = "yes"
            else:
                state = "no kernel yet"
            rows.append((op, name, state))
    return rows
