"""The quantkern command line, end to end on the built-in SmolLM2 (reference path, CPU)."""

import json
import re
import subprocess
import sys

import pytest

from quantkern.cli import main


def test_info_lists_every_backend_and_op():
    result = subprocess.run([sys.executable, "-m", "quantkern", "info"], capture_output=True, text=True, check=True)
    for word in ("cuda", "triton", "reference", "quantize_per_token", "weight_only_linear", "hadamard"):
        assert word in result.stdout


def test_info_says_when_the_extension_has_no_code_for_the_gpu(monkeypatch, capsys):
    import torch

    from quantkern import backends

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(backends, "_STATUS", {
        "cuda": backends.BackendStatus("cuda", True, "test build", frozenset(backends.EXTENSION_OPS)),
        "triton": backends.BackendStatus("triton", True, "test", frozenset(backends.OPS))})
    monkeypatch.setattr(backends, "_DEVICE_MISMATCH", {})
    monkeypatch.setattr(backends, "cuda_build_info", lambda: {"archs": "8.9"})
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "CUDA device: NVIDIA H100 80GB HBM3 (sm_90)" in out
    assert "the cuda backend cannot run here: quantkern._C was built for archs 8.9" in out


def test_quantize_builtin_model_reports_size_and_perplexity(builtin_model_available, tmp_path, capsys):
    dst = tmp_path / "smollm2-rtn"
    assert main(["quantize", "--dst", str(dst), "--bits", "4", "--group-size", "auto"]) == 0
    out = capsys.readouterr().out
    ppl = float(re.search(r"perplexity on .*: ([0-9.]+)", out).group(1))
    # RTN W4 g64 measured 33.69 here (fp32: 22.05); the bound fails if quantization or packing breaks.
    assert 30.0 < ppl < 37.0, out
    size_mib = float(re.search(r"\(([0-9.]+) MiB on disk", out).group(1))
    assert size_mib < 0.5 * 256.6  # fp16 model: 256.6 MiB, most of what remains is the fp16 embedding
    metadata = json.loads((dst / "quantization_metadata.json").read_text())
    assert metadata["tag"] == "RTN_w4_g64_headfp16" and metadata["group_size"] == 64
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quantkern"
    assert not list(tmp_path.glob(".*tmp-*")), "the staging directory was left behind"

    assert main(["info", str(dst)]) == 0
    assert "RTN_w4_g64_headfp16" in capsys.readouterr().out

    # The checkpoint loads back and reproduces the perplexity measured before saving.
    assert main(["eval", str(dst)]) == 0
    reloaded = float(re.search(r"perplexity ([0-9.]+) on", capsys.readouterr().out).group(1))
    assert abs(reloaded - ppl) < 0.01, (reloaded, ppl)

    # generate: the checkpoint answers through the chat template, as a greedy model.generate does.
    import torch

    from quantkern.cli import prompt_ids
    from quantkern.io import load_quantized

    question = "What is the capital of France?"
    assert main(["generate", str(dst), "--prompt", question, "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    model, tokenizer = load_quantized(dst)
    ids = prompt_ids(tokenizer, question, chat=True)
    assert tokenizer.decode(ids[0]).count("<|im_start|>") >= 2  # SmolLM2-Instruct's template: user, assistant
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert captured.out.strip() == expected.strip() and "Paris" in expected, (captured.out, expected)
    assert "tokens/s" in captured.err

    assert main(["quantize", "--dst", str(dst), "--no-eval"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err


def test_quantize_refuses_a_group_size_that_does_not_divide(builtin_model_available, tmp_path, capsys):
    assert main(["quantize", "--dst", str(tmp_path / "x"), "--group-size", "128", "--no-eval"]) == 2
    assert "does not divide in_features 576" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_info_on_missing_or_corrupt_checkpoint(tmp_path, capsys):
    assert main(["info", str(tmp_path)]) == 2
    assert "not a quantkern checkpoint" in capsys.readouterr().err
    (tmp_path / "quantization_metadata.json").write_text("{not json")
    assert main(["info", str(tmp_path)]) == 2
    assert "is corrupt" in capsys.readouterr().err


def test_eval_refuses_missing_and_corrupt_checkpoints(tmp_path, capsys):
    (tmp_path / "quantization_metadata.json").write_text('{"tag": "x"}')
    assert main(["eval", str(tmp_path)]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert main(["eval", str(tmp_path)]) == 2
    assert "not a quantkern checkpoint" in capsys.readouterr().err


def test_corrupt_weights_file_is_a_clear_error(builtin_model_available, tmp_path, capsys):
    dst = tmp_path / "ckpt"
    assert main(["quantize", "--dst", str(dst), "--no-eval"]) == 0
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: 1000])  # truncated
    assert main(["eval", str(dst)]) == 2
    assert "model.safetensors is corrupt" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "  "], "--prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--prompt", "hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["--prompt", "hi", "--device", "nonsense"], "is not a device"),
    (["--prompt", "hi", "--cuda-graph"], "need --device cuda"),
    (["--prompt", "hi", "--compile", "--temperature", "0.7"], "decode greedily"),
])
def test_generate_refuses_bad_arguments_before_loading(tmp_path, capsys, extra, message):
    assert main(["generate", str(tmp_path / "missing")] + extra) == 2
    assert message in capsys.readouterr().err


def test_generate_refuses_a_missing_checkpoint(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "missing"), "--prompt", "hi"]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_bad_group_size_spelling_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--group-size", "big"])
    assert "--group-size must be an integer" in capsys.readouterr().err
    for value in ("0", "-2"):  # 0 was saved as group_size 0 and loaded back per channel
        with pytest.raises(SystemExit):
            main(["quantize", "--group-size", value])
        assert "--group-size must be positive, -1" in capsys.readouterr().err


@pytest.mark.parametrize("make_calib, message", [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: (d / "empty.txt").write_text("\n  \n") and d / "empty.txt", "holds no text"),
    (lambda d: (d / "bad.jsonl").write_text('{"text": "ok"}\n[1, 2]\n') and d / "bad.jsonl",
     'bad.jsonl:2: expected an object with a "text" string field'),
])
def test_bad_calibration_file_fails_before_loading_the_model(tmp_path, capsys, make_calib, message):
    dst = tmp_path / "out"
    assert main(["quantize", "--method", "gptq", "--calib", str(make_calib(tmp_path)), "--dst", str(dst)]) == 2
    assert message in capsys.readouterr().err
    assert not dst.exists()


def test_calibration_file_for_a_method_without_calibration_is_refused(tmp_path, capsys):
    calib = tmp_path / "calib.txt"
    calib.write_text("some text\n")
    assert main(["quantize", "--method", "rtn", "--calib", str(calib), "--dst", str(tmp_path / "x")]) == 2
    assert "rtn, which needs no calibration data" in capsys.readouterr().err


def test_unknown_method_and_bad_options_are_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "magic"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err
    assert main(["quantize", "--method", "gptq", "--option", "damp", "--dst", str(tmp_path / "x")]) == 2
    assert "--option expects KEY=VALUE" in capsys.readouterr().err
    assert main(["quantize", "--method", "gptq", "--option", "dampening=0.1", "--dst", str(tmp_path / "x")]) == 2
    assert "unknown --option ['dampening']" in capsys.readouterr().err


def test_existing_destination_is_refused_before_any_work(tmp_path, capsys):
    dst = tmp_path / "exists"
    dst.mkdir()
    (dst / "keep.txt").write_text("user data")
    assert main(["quantize", "--dst", str(dst)]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    # --overwrite replaces only a quantkern checkpoint: this directory (or one holding --src) is not one.
    src = dst / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    assert main(["quantize", "--src", str(src), "--dst", str(dst), "--overwrite"]) == 2
    assert "not a quantkern checkpoint" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "user data" and (src / "config.json").is_file()


def test_quantize_evaluates_in_the_checkpoint_dtype_on_a_gpu():
    """After quantizing, `quantkern quantize --device cuda` evaluates in the checkpoint's dtype: the GPU kernels
    refuse fp32 activations (it used to upcast to fp32 everywhere and fail there). The CPU keeps fp32."""
    import torch

    from quantkern.cli import evaluation_dtype

    assert evaluation_dtype("cuda", torch.bfloat16) == torch.bfloat16
    assert evaluation_dtype("cuda:1", torch.float16) == torch.float16
    assert evaluation_dtype("cpu", torch.float16) == torch.float32


@pytest.mark.parametrize("extra, message", [(["--eval-text", "/no/such/text.txt"], "no such file"),
                                            (["--seq-len", "1"], "at least 2")])
def test_bad_evaluation_inputs_fail_before_any_work(tmp_path, capsys, extra, message):
    """The perplexity runs after the checkpoint is written: its inputs are checked first, so a typo costs
    nothing and leaves no checkpoint behind."""
    dst = tmp_path / "out"
    assert main(["quantize", "--dst", str(dst)] + extra) == 2
    assert message in capsys.readouterr().err
    assert not dst.exists()


def test_bad_device_or_destination_fails_before_any_work(tmp_path, capsys):
    import torch

    (tmp_path / "afile").write_text("x")
    cases = [(["--device", "bogus"], "is not a device"),
             (["--dst", str(tmp_path / "afile" / "sub")], "is not a directory")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "no CUDA device is visible"))
    for args, message in cases:
        assert main(["quantize", "--no-eval"] + args) == 2, args
        assert message in capsys.readouterr().err, args
