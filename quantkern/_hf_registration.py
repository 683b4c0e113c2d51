"""Registers quantkern's ``transformers`` quantizer (``quantkern.hf_integration``) when transformers loads.

``import quantkern`` calls ``install()``. Importing ``transformers.quantizers.auto`` (where the
registry lives) costs about 2.4 s on the 2-core CPU machine (1.7 s beyond ``import transformers``, which
is lazy; ``import quantkern`` itself takes about 2.4 s, nearly all of it torch), so registering eagerly
would double the import time of every quantkern user, transformers user or not. Instead:

* transformers not installed: nothing happens (``import quantkern`` works without it);
* ``transformers.quantizers.auto`` already imported: register now (cheap);
* otherwise a finder at the front of ``sys.meta_path`` waits for that module's import (which
  ``from_pretrained`` triggers, through ``transformers.modeling_utils``), lets it run, registers
  right after it, and removes itself. So after ``import quantkern``,
  ``AutoModelForCausalLM.from_pretrained(dir)`` finds the quantizer, whichever is imported first.

A failure to register is a warning, never an error inside transformers' import.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings

REGISTRY_MODULE = "transformers.quantizers.auto"


def _register() -> None:
    importing = sys.modules.get(f"{__package__}.hf_integration")
    if importing is not None and not hasattr(importing, "register"):
        return  # its own import (which loaded transformers' registry) is under way: it registers at its end
    try:
        from . import hf_integration

        hf_integration.register()
    except Exception as error:  # a transformers we do not fit must not break transformers' own import
        warnings.warn(f"quantkern: could not register its transformers quantizer "
                      f"({type(error).__name__}: {error}); use quantkern.io.load_quantized")


class _RegisterAfterImport:
    """Meta path finder: for ``REGISTRY_MODULE`` only, the spec of the next finder, whose loader
    registers quantkern right after executing the module."""

    quantkern_registration_hook = True  # lets install() recognise an instance across reloads

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or getattr(finder, "quantkern_registration_hook", False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _remove_hooks()
            _register()

        spec.loader.exec_module = exec_module  # this loader instance serves this one module
        return spec


def _remove_hooks() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "quantkern_registration_hook", False)]


def install() -> None:
    """Register now if transformers' quantizer registry is loaded, else when it loads (see above)."""
    if REGISTRY_MODULE in sys.modules:
        _remove_hooks()
        _register()
        return
    try:
        if importlib.util.find_spec("transformers") is None:
            return
    except (ImportError, ValueError):  # a broken or half-removed installation: act as if absent
        return
    if not any(getattr(f, "quantkern_registration_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
