"""Calibration data: token windows from a text file, a JSONL file, or the model itself.

* A ``.jsonl`` file (any case of the suffix) holds one JSON object per line with a ``"text"`` field;
  any other file is plain text with one sample per line. Files must be UTF-8 (a leading byte-order
  mark is dropped); other bytes are an error naming their offset, not silently replaced. Blank lines
  are skipped; a missing file, or one with no text, is an error.
* The samples are joined (a newline between them), tokenized once, and ``n_samples`` windows of
  ``seq_len`` tokens are cut at seeded random offsets (the GPTQ/AWQ papers' recipe). A text shorter
  than one window is an error; a text shorter than ``n_samples`` windows gives overlapping windows.
* Without a file, the model writes its own samples (data-free calibration, as in LLM-QAT): each
  sample starts from a random token and continues by sampling from the model itself, so the
  default path needs no dataset.

The sha256 of the exact token windows used is recorded in the checkpoint's metadata.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional

import torch


# Calibration text that Debian/Ubuntu machines carry and that is disjoint from the default evaluation
# text (quantkern.evaluation.DEFAULT_EVAL_TEXT, GPL-3): the non-GPL license texts.
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_CALIBRATION_SOURCES = ("Apache-2.0", "Artistic", "BSD", "CC0-1.0", "GFDL-1.2", "GFDL-1.3", "MPL-1.1",
                               "MPL-2.0")


def write_license_calibration_text(path) -> Path:
    """Write the concatenated non-GPL license texts of this machine to ``path``; FileNotFoundError
    naming the missing ones where the machine lacks them."""
    missing = [name for name in LICENSE_CALIBRATION_SOURCES if not (LICENSE_DIR / name).is_file()]
    if missing:
        raise FileNotFoundError(f"calibration sources missing from {LICENSE_DIR}: {missing}")
    path = Path(path)
    path.write_text("".join((LICENSE_DIR / name).read_text() for name in LICENSE_CALIBRATION_SOURCES))
    return path


@dataclass
class CalibrationInfo:
    source: str  # file path, or "self-generated"
    samples: int
    seq_len: int
    seed: int
    sha256: str  # of the int64 token windows, row-major

    def as_dict(self) -> dict:
        return asdict(self)


def read_calibration_texts(path) -> List[str]:
    """Samples of a calibration file: JSONL ``"text"`` fields, or non-blank lines of a text file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} does not exist")
    try:
        raw = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"calibration file {path} is not UTF-8 text: byte offset {error.start} "
                         f"({error.object[error.start:error.start + 1]!r}); convert it to UTF-8 first") from None
    if path.suffix.lower() == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f'{path}:{number}: expected an object with a "text" string field')
            texts.append(record["text"])
    else:
        texts = raw.splitlines()
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError(f"calibration file {path} holds no text")
    return texts


def windows_from_texts(tokenizer, texts: List[str], n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    """``n_samples`` windows [n_samples, seq_len] (int64) cut at seeded random offsets of the joined texts."""
    _check_counts(n_samples, seq_len)
    ids = tokenizer("\n".join(texts), return_tensors="pt")["input_ids"][0]
    if ids.numel() < seq_len:
        raise ValueError(f"calibration text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n_samples,), generator=generator)
    return torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def self_generated_windows(model, n_samples: int, seq_len: int, seed: int, batch_size: int = 16,
                           vocab_size: Optional[int] = None, progress: bool = False) -> torch.Tensor:
    """Data-free calibration: windows the model writes itself, each from a random first token,
    continued by sampling from the model's distribution (temperature 1). ``progress``: a bar counting
    the windows written (generation is the slow part of a data-free run)."""
    from tqdm.auto import tqdm

    _check_counts(n_samples, seq_len)
    vocab_size = vocab_size or model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    torch.manual_seed(seed)  # generate() samples with the global generator
    bar = tqdm(total=n_samples, desc="self-generated calibration", unit="window", disable=not progress)
    try:
        windows = []
        for first in range(0, n_samples, batch_size):
            count = min(batch_size, n_samples - first)
            start = torch.randint(0, vocab_size, (count, 1), generator=generator).to(device)
            out = model.generate(start, attention_mask=torch.ones_like(start), do_sample=True, top_k=0,
                                 top_p=1.0, temperature=1.0, max_new_tokens=seq_len - 1,
                                 min_new_tokens=seq_len - 1, pad_token_id=0)
            windows.append(out[:, :seq_len].cpu())
            bar.update(count)
    finally:
        bar.close()
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
    return torch.cat(windows)


def check_seq_len(model, seq_len: int) -> None:
    """ValueError if ``seq_len`` exceeds the model's ``max_position_embeddings`` (when it has one)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise ValueError(f"calibration windows of {seq_len} tokens are longer than the model's "
                         f"max_position_embeddings={limit}; use a calibration length <= {limit}")


def calibration_windows(model, tokenizer, path=None, n_samples: int = 128, seq_len: int = 512,
                        seed: int = 0, progress: bool = False):
    """``(windows [n_samples, seq_len], CalibrationInfo)`` from ``path``, or self-generated when None
    (``progress``: a bar while the model writes them)."""
    check_seq_len(model, seq_len)
    if path is not None:
        windows = windows_from_texts(tokenizer, read_calibration_texts(path), n_samples, seq_len, seed)
        source = str(Path(path).expanduser().resolve())
    else:
        windows = self_generated_windows(model, n_samples, seq_len, seed, progress=progress)
        source = "self-generated"
    return windows, CalibrationInfo(source, n_samples, seq_len, seed, windows_sha256(windows))


def windows_sha256(windows: torch.Tensor) -> str:
    """sha256 of token windows as int64, row-major: what the metadata records."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().cpu().numpy().tobytes()).hexdigest()


def _check_counts(n_samples: int, seq_len: int) -> None:
    if n_samples < 1:
        raise ValueError(f"calibration needs at least one sample, got {n_samples}")
    if seq_len < 2:
        raise ValueError(f"calibration windows need at least 2 tokens, got {seq_len}")
