"""Calibration windows: files (text, JSONL), errors, seeding, and data-free self-generated samples."""

import pytest
import torch

from quantkern.calibration import (
    calibration_windows,
    read_calibration_texts,
    self_generated_windows,
    windows_from_texts,
)


class CharTokenizer:
    """One token per character: enough to check windowing without a real tokenizer."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n   \nsecond line\n")
    assert read_calibration_texts(tmp_path / "a.txt") == ["first line", "second line"]
    (tmp_path / "b.jsonl").write_text('{"text": "one\\ntwo"}\n\n{"text": "three", "id": 3}\n')
    assert read_calibration_texts(tmp_path / "b.jsonl") == ["one\ntwo", "three"]


@pytest.mark.parametrize("content, suffix, message", [
    (None, ".txt", "does not exist"),
    ("", ".txt", "holds no text"),
    ("\n \n\t\n", ".txt", "holds no text"),
    ('{"text": "ok"}\n{broken\n', ".jsonl", ":2: not valid JSON"),
    ('{"body": "no text field"}\n', ".jsonl", ':1: expected an object with a "text" string field'),
])
def test_bad_files_are_clear_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"calib{suffix}"
    if content is not None:
        path.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        read_calibration_texts(path)


def test_files_must_be_utf8_and_jsonl_suffix_is_case_insensitive(tmp_path):
    # Non-UTF-8 bytes used to be replaced by U+FFFD silently.
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1\.txt is not UTF-8 text: byte offset 3"):
        read_calibration_texts(tmp_path / "latin1.txt")
    # A byte-order mark is not text (it used to break the first JSON line), and .JSONL is JSONL.
    (tmp_path / "bom.jsonl").write_bytes('{"text": "one"}\n'.encode("utf-8-sig"))
    assert read_calibration_texts(tmp_path / "bom.jsonl") == ["one"]
    (tmp_path / "upper.JSONL").write_text('{"text": "two"}\n')
    assert read_calibration_texts(tmp_path / "upper.JSONL") == ["two"]


def test_windows_longer_than_the_model_are_refused_before_any_work():
    # quantize_model checked this; calibration_windows called directly did not.
    from types import SimpleNamespace

    from quantkern.calibration import calibration_windows

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=64))  # generating would fail: no model
    with pytest.raises(ValueError, match="windows of 100 tokens are longer than .* max_position_embeddings=64"):
        calibration_windows(model, None, None, n_samples=2, seq_len=100)


def test_windows_are_seeded_slices_of_the_joined_text():
    texts = ["abcdefghij", "klmnopqrst"]
    joined = torch.tensor([ord(c) for c in "\n".join(texts)])
    w1 = windows_from_texts(CharTokenizer(), texts, n_samples=5, seq_len=4, seed=3)
    w2 = windows_from_texts(CharTokenizer(), texts, n_samples=5, seq_len=4, seed=3)
    w3 = windows_from_texts(CharTokenizer(), texts, n_samples=5, seq_len=4, seed=4)
    assert w1.shape == (5, 4) and torch.equal(w1, w2) and not torch.equal(w1, w3)
    for row in w1:  # every window is a contiguous slice of the joined text
        assert any(torch.equal(row, joined[s:s + 4]) for s in range(len(joined) - 3))
    with pytest.raises(ValueError, match="fewer than one window of 64"):
        windows_from_texts(CharTokenizer(), texts, n_samples=1, seq_len=64, seed=0)
    with pytest.raises(ValueError, match="at least one sample"):
        windows_from_texts(CharTokenizer(), texts, n_samples=0, seq_len=4, seed=0)


def test_sha256_identifies_the_windows(tmp_path):
    (tmp_path / "c.txt").write_text("the quick brown fox jumps over the lazy dog\n" * 3)
    windows, info = calibration_windows(None, CharTokenizer(), tmp_path / "c.txt", n_samples=4, seq_len=8, seed=0)
    again, info2 = calibration_windows(None, CharTokenizer(), tmp_path / "c.txt", n_samples=4, seq_len=8, seed=0)
    _, other = calibration_windows(None, CharTokenizer(), tmp_path / "c.txt", n_samples=4, seq_len=8, seed=1)
    assert info.sha256 == info2.sha256 != other.sha256 and len(info.sha256) == 64
    assert info.samples == 4 and info.seq_len == 8 and info.source.endswith("c.txt")


def test_self_generated_windows_are_seeded_and_leave_global_rng_alone():
    from tests.test_models import tiny_model

    model = tiny_model("llama")
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = self_generated_windows(model, n_samples=3, seq_len=6, seed=0, batch_size=2)
    after = torch.rand(1)
    b = self_generated_windows(model, n_samples=3, seq_len=6, seed=0, batch_size=2)
    assert a.shape == (3, 6) and a.dtype == torch.int64 and torch.equal(a, b)
    assert torch.equal(before, after), "calibration sampling changed the caller's random stream"
    assert int(a.max()) < 128


def test_self_generated_windows_show_progress_only_when_asked(capsys):
    from tests.test_models import tiny_model

    model = tiny_model("llama")
    quiet = self_generated_windows(model, n_samples=3, seq_len=4, seed=0, batch_size=2)
    assert "self-generated calibration" not in capsys.readouterr().err
    shown = self_generated_windows(model, n_samples=3, seq_len=4, seed=0, batch_size=2, progress=True)
    err = capsys.readouterr().err
    assert "self-generated calibration" in err and "3/3" in err
    assert torch.equal(quiet, shown)
