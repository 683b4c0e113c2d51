"""The quantkern command line, end to end on the built-in SmolLM2 (reference path, CPU)."""

import json
import os
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
    eval_out = capsys.readouterr().out
    reloaded = float(re.search(r"perplexity ([0-9.]+) on", eval_out).group(1))
    assert abs(reloaded - ppl) < 0.01, (reloaded, ppl)
    # on the CPU the reference path's dequantization bounds generation, not Python overhead
    generation = re.search(r"^generation: .*$", eval_out, re.MULTILINE).group(0)
    assert "dequantizes every layer at every token" in generation and "Python overhead" not in generation

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
    assert "argument --group-size: must be an integer" in capsys.readouterr().err
    # 0 was saved as group_size 0 and loaded back per channel; 48 and 256 were refused only after the model loaded.
    for value in ("0", "-2", "48", "256"):
        with pytest.raises(SystemExit) as exit_info:
            main(["quantize", "--group-size", value])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --group-size: must be 32, 64, 128, -1 (per channel) or 'auto', got {value}" in err
        assert "usage: quantkern quantize" in err  # the subcommand's usage, not the top-level one


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


def test_option_values_read_as_json_and_python_booleans():
    from quantkern.cli import _parse_options

    options = _parse_options(["act_order=False", "static_groups=true", "damp=0.01", "weights=rtn", "x=None"])
    # "False" stayed the string "False" (truthy: GPTQ then ran with act-order); "None" is no JSON and stays a string
    assert options == {"act_order": False, "static_groups": True, "damp": 0.01, "weights": "rtn", "x": "None"}


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


@pytest.fixture
def no_model_loading(monkeypatch):
    """Makes loading the source model fail the test: what is asserted must be refused before it."""
    from quantkern import cli

    def load_source(src, device):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(cli, "_load_source", load_source)


@pytest.mark.parametrize("extra, message", [
    (["--bits", "8"], "--bits 8 needs --acts-bits 8 (W8A8), got W8A16"),
    (["--bits", "8", "--acts-bits", "4"], "--bits 8 needs --acts-bits 8 (W8A8), got W8A4"),
    (["--method", "gptq", "--calib-samples", "0"], "--calib-samples must be at least 1, got 0"),
    (["--method", "gptq", "--calib-seq-len", "1"], "--calib-seq-len must be at least 2, got 1"),
])
def test_bad_flag_combinations_fail_before_loading_the_model(tmp_path, capsys, no_model_loading, extra, message):
    dst = tmp_path / "out"
    assert main(["quantize", "--dst", str(dst), "--no-eval"] + extra) == 2
    assert message in capsys.readouterr().err
    assert not dst.exists()


def test_empty_evaluation_text_fails_before_any_work(tmp_path, capsys, no_model_loading):
    """An empty --eval-text failed only after quantizing and writing the checkpoint (exit 2 with a checkpoint
    written), and `quantkern eval` loaded the checkpoint first."""
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    dst = tmp_path / "out"
    assert main(["quantize", "--dst", str(dst), "--eval-text", str(empty)]) == 2
    assert f"--eval-text {empty} is empty" in capsys.readouterr().err
    assert not dst.exists()
    # eval checks its text before it reads the checkpoint (which here does not exist)
    assert main(["eval", str(tmp_path / "missing"), "--eval-text", str(empty)]) == 2
    assert f"--eval-text {empty} is empty" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--seq-len", "1"]) == 2
    assert "--seq-len must be at least 2" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--gen-tokens", "-1"]) == 2
    assert "--gen-tokens must be 0 (skip) or more, got -1" in capsys.readouterr().err


def _proc_refuses_new_files() -> bool:
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(dir="/proc"))
    except OSError:
        return True
    return False


@pytest.mark.skipif(not os.path.isdir("/proc") or not _proc_refuses_new_files(),
                    reason="needs /proc, a file system that refuses new directories even to root")
def test_unwritable_destination_fails_before_any_work(tmp_path, capsys, no_model_loading):
    """Write permission bits do not bind root, so `--dst /proc/x` passed the early check and failed after
    quantizing, when the staging directory was made."""
    assert main(["quantize", "--dst", "/proc/quantkern-test/out", "--no-eval"]) == 2
    assert "cannot write /proc/quantkern-test/out: /proc refuses new files" in capsys.readouterr().err
    assert main(["convert", str(tmp_path), "--dst", "/proc/quantkern-test"]) == 2
    assert "cannot write /proc/quantkern-test: /proc refuses new files" in capsys.readouterr().err


@pytest.mark.parametrize("quant_method, hint", [("gptq", "quantkern convert"), ("quantkern", None)])
def test_an_already_quantized_source_is_refused_before_loading(tmp_path, capsys, quant_method, hint):
    """A quantkern checkpoint as --src used to load and then fail with 'found no nn.ModuleList of decoder
    blocks holding Linears'; a GPTQ one went to transformers' own GPTQ loader."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llama",
                                                 "quantization_config": {"quant_method": quant_method}}))
    assert main(["quantize", "--src", str(src), "--dst", str(tmp_path / "out"), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert f"--src {src} is already quantized (quant_method {quant_method})" in err
    assert (hint in err) if hint else "convert" not in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_a_source_with_corrupt_weights_is_a_clear_error(builtin_model_available, tmp_path, capsys):
    """A truncated model.safetensors in --src raised safetensors' SafetensorError: a traceback, exit 1."""
    import shutil

    from quantkern.builtin_model import builtin_model_dir

    src = tmp_path / "src"
    src.mkdir()
    for path in builtin_model_dir().glob("*.json"):
        shutil.copy(path, src / path.name)
    (src / "model.safetensors").write_bytes((builtin_model_dir() / "model.safetensors").read_bytes()[:1000])
    (src / "config.json").write_text("{broken")
    assert main(["quantize", "--src", str(src), "--dst", str(tmp_path / "out"), "--no-eval"]) == 2
    assert f"--src {src}/config.json is corrupt" in capsys.readouterr().err
    shutil.copy(builtin_model_dir() / "config.json", src / "config.json")
    assert main(["quantize", "--src", str(src), "--dst", str(tmp_path / "out"), "--no-eval"]) == 2
    assert f"--src {src}: cannot load the model: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_interrupt_is_one_line_and_leaves_nothing_half_written(builtin_model_available, tmp_path, capsys,
                                                               monkeypatch):
    """Ctrl-C printed a KeyboardInterrupt traceback. Here it comes while the checkpoint is being written
    (the tokenizer's files go last into the staging directory): exit 130, no --dst, no staging directory."""
    from transformers import AutoTokenizer

    from quantkern.builtin_model import builtin_model_dir

    tokenizer_class = type(AutoTokenizer.from_pretrained(builtin_model_dir(), local_files_only=True))

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokenizer_class, "save_pretrained", interrupted)
    dst = tmp_path / "out"
    assert main(["quantize", "--dst", str(dst), "--no-eval"]) == 130
    err = capsys.readouterr().err
    assert err.rstrip().endswith("quantkern quantize: interrupted") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
