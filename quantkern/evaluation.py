"""Perplexity of a causal language model on a text, for checking kernels end to end.

The convention below is the one that reproduces the project's anchor figure:
fp32 SmolLM2-135M-Instruct on GPL-3, 7,658 tokens, 512-token windows = 22.06.
With the exact fp32 weights this gives 22.0475. That is 0.0125 below the quoted
figure, and no other convention comes closer. The quoted 22.06 is exactly what
the same convention gives with the weights rounded to bfloat16 (22.0594). That
suggests, but does not prove, that the anchor was measured on a bfloat16 copy.

* The whole text is tokenized once, the tokenizer's defaults deciding special
  tokens. SmolLM2's tokenizer adds no BOS token (its GGUF sets
  ``add_bos_token = False``), so the 7,658 tokens are the text alone.
* The tokens are cut into consecutive, non-overlapping windows of ``seq_len``
  tokens. The last, shorter window is kept (GPL-3 at 512: 14 full windows and
  one of 490 tokens); a final window of a single token predicts nothing and is
  skipped.
* Each window is run on its own, with no context from the previous one, so its
  first token is never predicted: a window of n tokens contributes n - 1
  predictions (GPL-3 at 512: 7,658 - 15 = 7,643 predicted tokens).
* The result is exp of the mean negative log-likelihood over all predicted
  tokens (a token-weighted mean, not a mean of per-window perplexities).

Other conventions give noticeably different figures for the same model: adding a
BOS token to each window gives 22.46, dropping the partial last window 22.97,
and averaging per-window mean losses 22.01.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

DEFAULT_EVAL_TEXT = "/usr/share/common-licenses/GPL-3"


def _read_text(text_or_path: str | os.PathLike) -> str:
    """A path-like is always read as a file. A str is read as a file when it is one
    line that names an existing file or looks like a path (contains a path
    separator or starts with '~'); any other str is the text itself."""
    if isinstance(text_or_path, os.PathLike):
        path = Path(text_or_path)
    elif "\n" not in text_or_path and (
        os.path.isfile(text_or_path) or os.sep in text_or_path or text_or_path.startswith("~")
    ):
        path = Path(text_or_path)
    else:
        return text_or_path

    path = path.expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Evaluation text file not found: {path}")
    return path.read_text(encoding="utf-8")


def perplexity(
    model,
    tokenizer,
    text_or_path: str | os.PathLike = DEFAULT_EVAL_TEXT,
    seq_len: int = 512,
    max_windows: int | None = None,
    progress: bool = True,
) -> float:
    """Return exp(mean token NLL) of ``model`` on a text, in non-overlapping windows.

    ``text_or_path`` is the text itself or a file to read (see ``_read_text``).
    ``max_windows`` limits the evaluation to the first that many windows.
    The model runs on the device its parameters are on; see the module docstring
    for the exact convention.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context token and one predicted), got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be at least 1 or None, got {max_windows}")

    text = _read_text(text_or_path)
    if not text.strip():
        raise ValueError("The evaluation text is empty")
    token_ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
    if token_ids.numel() < 2:
        raise ValueError(
            f"The evaluation text has {token_ids.numel()} token(s); perplexity needs at least 2"
        )

    # Keep every window with at least 2 tokens, including the shorter last one.
    window_starts = [start for start in range(0, token_ids.numel(), seq_len) if token_ids.numel() - start >= 2]
    if max_windows is not None:
        window_starts = window_starts[:max_windows]

    device = next(model.parameters()).device
    total_nll = 0.0  # summed in Python floats (float64): thousands of terms
    predicted_tokens = 0
    with torch.no_grad():
        for start in tqdm(window_starts, desc="perplexity", unit="window", disable=not progress):
            window = token_ids[start : start + seq_len].to(device)
            logits = model(window.unsqueeze(0)).logits[0]
            # Position i predicts token i + 1. Log-softmax in float32 even for half models.
            window_nll = F.cross_entropy(logits[:-1].float(), window[1:], reduction="sum")
            total_nll += window_nll.item()
            predicted_tokens += window.numel() - 1

    return math.exp(total_nll / predicted_tokens)
