"""Host side of the Triton ops: ``triton_op`` (a custom op called directly in plain eager mode) and
plain-integer ``cdiv`` / ``next_power_of_2``.

Every Triton entry point is a ``torch.library.custom_op`` with a fake implementation, so that
``torch.compile``, ``torch.export``, FakeTensor and meta tracing see one opaque op. In plain eager mode
that layer is host time and nothing else: on the H200 machine's CPU (torch 2.11) a W4A16 call through
the op took 22-104 us more than the same function called directly (three runs of
``python scripts/probe_triton_w4a16.py --host``, 4096 x 4096, M = 1), where the kernel takes ~14 us of GPU
time. So the callable returned here runs the function itself when nothing traces it (no compilation,
no jit tracing, no dispatch mode, plain non-meta tensors) and goes through the registered op otherwise.
Both run the same code on the same tensors.

``triton.cdiv`` and ``triton.next_power_of_2`` are constexpr functions meant for kernels: called on the host
they cost ~3 us each on the development CPU (Triton 3.8), against ~0.1 us for plain integer arithmetic.
Host code uses the plain versions here.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (as ``triton.next_power_of_2``: 0 for n = 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _traced(args) -> bool:
    """Whether a call with these arguments must go through the dispatcher (tracing, fake or meta tensors)."""
    # (torch.jit.trace, and the TorchScript ONNX export built on it, record ops at the dispatcher: a
    # direct call would leave the kernel out of the trace.)
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or _get_current_dispatch_mode() is not None:
        return True
    for arg in args:
        if isinstance(arg, torch.Tensor) and (type(arg) is not torch.Tensor or arg.is_meta):
            return True
    return False


def triton_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as the custom op ``name`` (no mutated arguments) with ``fake``; return a
    callable (same signature, positional arguments) that skips the dispatcher in plain eager calls.
    The registered op stays reachable as ``.op`` (and as ``torch.ops.<name>``)."""

    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)

        def call(*args):
            return op(*args) if _traced(args) else fn(*args)

        call.op = op
        call.__name__ = fn.__name__
        call.__doc__ = fn.__doc__
        return call

    return wrap
