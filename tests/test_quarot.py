"""QuaRot (quantkern.quantizers.quarot): exactness of the rotations on the float model, the online
Hadamards, quality against RTN on a truncated SmolLM2, configuration errors, checkpoint round trip."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quantkern import reference
from quantkern.models import model_structure
from quantkern.nn import QuantLinear
from quantkern.quantizers import QuantizeConfig, quantize_model
from quantkern.quantizers.quarot import quarot_transform


def tiny_llama(tie=True, seed=0):
    """A random Llama with Hadamard-friendly sizes (hidden 64 = 4 heads x 16, intermediate 128) and
    non-trivial norm weights, so that folding them is tested."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 2.0)
    return model


def ids(n=2, seq=32, vocab=256, seed=1):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def relative_error(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("rotation", ["hadamard", "pca"])
@pytest.mark.parametrize("tie", [True, False])
def test_fold_and_rotate_keep_the_float_logits(rotation, tie):
    model = tiny_llama(tie)
    tokens = ids()
    expected = logits(model, tokens)
    structure = model_structure(model)
    quarot_transform(structure, rotation, seed=3, windows=ids(4, 32, seed=2))
    assert relative_error(logits(model, tokens), expected) < 1e-4
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings is False
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(param, torch.ones_like(param)), name
    # The rotation really changed the weights (not the identity).
    assert not torch.allclose(model.model.layers[0].self_attn.q_proj.weight, tiny_llama(tie).model.layers[0].self_attn.q_proj.weight)


def test_pca_statistics_show_progress_only_when_asked(capsys):
    from quantkern.quantizers.quarot import residual_second_moment

    structure = model_structure(tiny_llama())
    quiet = residual_second_moment(structure, ids(2, 16))
    assert "PCA statistics" not in capsys.readouterr().err
    shown = residual_second_moment(structure, ids(2, 16), progress=True)
    err = capsys.readouterr().err
    assert "PCA statistics" in err and "2/2" in err  # one step per block
    assert torch.equal(quiet, shown)


def test_online_hadamards_are_needed_and_exact_through_quantlinear():
    model = tiny_llama()
    tokens = ids()
    expected = logits(model, tokens)
    handles = quarot_transform(model_structure(model), "hadamard", seed=0)
    assert len(handles) == 2 * 2  # o_proj and down_proj of each block
    assert relative_error(logits(model, tokens), expected) < 1e-4
    # Without the online transform the fused H^T is not undone.
    for handle in handles:
        handle.remove()
    assert relative_error(logits(model, tokens), expected) > 1e-2
    # QuantLinear(input_rotation="hadamard") applies the same transform: W8 weight-only is close.
    for layer in model.model.layers:
        for parent, role in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
            linear = getattr(parent, role)
            qw = reference.quantize_weight(linear.weight.detach(), 8, -1, True)
            setattr(parent, role, QuantLinear.from_quantized(qw, linear.bias, input_rotation="hadamard"))
    assert relative_error(logits(model, tokens), expected) < 2e-2


def test_weights_follow_the_documented_formulas():
    # Without online rotations: W_v <- B_kv (W_v diag(g)) Q and W_o <- Q^T W_o B^T, with Q the seeded
    # random Hadamard of the residual and B = I (x) H_d the per-head Hadamard.
    from quantkern.rotation import block_diagonal_hadamard, random_hadamard_matrix

    original = tiny_llama().model.layers[0]
    model = tiny_llama()
    quarot_transform(model_structure(model), "hadamard", seed=5, online_hadamard=False)
    q = random_hadamard_matrix(64, 5)
    gain = original.input_layernorm.weight.detach().double()
    v = original.self_attn.v_proj.weight.detach().double() * gain[None, :]
    o = original.self_attn.o_proj.weight.detach().double()
    layer = model.model.layers[0].self_attn
    assert torch.allclose(layer.v_proj.weight.double(), block_diagonal_hadamard(16, 2) @ v @ q, atol=1e-6)
    assert torch.allclose(layer.o_proj.weight.double(), q.T @ o @ block_diagonal_hadamard(16, 4).T, atol=1e-6)


def small_config(**kwargs):
    base = dict(method="quarot", bits=4, group_size=-1, act_bits=4, kernel_shapes="reference",
                options={"weights": "rtn", "act_clip_search": False})
    base.update(kwargs)
    return QuantizeConfig(**base)


def test_quarot_w4a4_kv4_runs_and_sets_the_layers():
    model = tiny_llama()
    tokens = ids()
    expected = logits(model, tokens)
    result = quantize_model(model, None, small_config(kv_bits=4), progress=False)
    from quantkern.kv_cache import kv_quantization_settings

    assert kv_quantization_settings(model) == {"bits": 4, "rotate_keys": True}
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.o_proj.input_rotation == "hadamard" and mlp.down_proj.input_rotation == "hadamard"
    assert attention.q_proj.input_rotation is None
    assert attention.q_proj.act_bits == 4 and attention.q_proj.act_clip_ratio == 0.9
    assert isinstance(model.lm_head, nn.Linear)  # kept in float
    assert result.extra_config["rotation"] == "hadamard"
    out = logits(model, tokens)
    # Measured 0.145 (0.10-0.15 over model seeds); all-zero logits give 1.0, an unrelated random model 0.74-0.85.
    assert torch.isfinite(out).all() and relative_error(out, expected) < 0.3


class ByteTokenizer:
    """Enough of a tokenizer for ``calibration.windows_from_texts``: one token per byte."""

    def __call__(self, text, return_tensors="pt"):
        return {"input_ids": torch.tensor([list(text.encode("utf-8"))], dtype=torch.int64)}


def test_quarot_gptq_weights(tmp_path):
    # GPTQ fits the calibration distribution: compare on held-out text of that distribution (on random ids it
    # loses to RTN on every seed), by the norm of the error (the max-abs one ranks GPTQ and RTN by chance).
    model = tiny_llama()
    held_out = "The above copyright notice and this permission notice shall be included in all copies."
    tokens = ByteTokenizer()(held_out)["input_ids"]
    expected = logits(model, tokens)
    calib = tmp_path / "calib.txt"
    calib.write_text("Permission is hereby granted, free of charge, to any person obtaining a copy.\n" * 20)
    config = small_config(act_bits=8, options={"act_clip_search": False}, calib_path=str(calib), calib_samples=8,
                          calib_seq_len=32)
    result = quantize_model(model, ByteTokenizer(), config, progress=False)
    assert result.calibration["samples"] == 8

    def norm_error(out):
        return float((out - expected).norm() / expected.norm())

    error_gptq = norm_error(logits(model, tokens))
    rtn_model = tiny_llama()
    quantize_model(rtn_model, None, small_config(act_bits=8), progress=False)
    error_rtn = norm_error(logits(rtn_model, tokens))
    # Measured 0.089 vs RTN 0.132 (ratio 0.67; 0.48-0.78 over model seeds 0-5).
    assert error_gptq < 0.2 and error_gptq < 0.85 * error_rtn, (error_gptq, error_rtn)


def test_pca_rotation_through_the_driver(tmp_path):
    model = tiny_llama()
    tokens = ids()
    expected = logits(model, tokens)
    calib = tmp_path / "calib.txt"
    calib.write_text("Redistribution and use in source and binary forms, with or without modification.\n" * 20)
    config = small_config(rotation="pca", calib_path=str(calib), calib_samples=4, calib_seq_len=32)
    result = quantize_model(model, ByteTokenizer(), config, progress=False)
    assert result.extra_config["rotation"] == "pca"
    out = logits(model, tokens)
    # Measured 0.113 (0.10-0.12 over model seeds); the Hadamard rotation, same config: 0.141 (bound 0.3 above).
    assert torch.isfinite(out).all() and relative_error(out, expected) < 0.25


def test_activation_clip_search_picks_per_layer_ratios(tmp_path):
    from quantkern.quantizers.quarot import ACT_CLIP_GRID

    model = tiny_llama()
    calib = tmp_path / "calib.txt"
    calib.write_text("Licensed under the Apache License, Version 2.0; you may not use this file except.\n" * 20)
    config = small_config(options={"weights": "rtn"}, calib_path=str(calib), calib_samples=4, calib_seq_len=32)
    result = quantize_model(model, ByteTokenizer(), config, progress=False)
    clips = result.extra_config["act_clip_ratios"]
    assert len(clips) == 2 * 7 and set(clips.values()) <= set(ACT_CLIP_GRID)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert module.act_clip_ratio == clips[name]


@pytest.mark.parametrize("kwargs, message", [
    (dict(rotation="givens"), "rotation must be one of"),
    (dict(act_bits=4, symmetric=False), "symmetric"),
    (dict(options={"weights": "awq"}), "weights must be 'gptq' or 'rtn'"),
    (dict(options={"act_clip_ratio": 1.5}), "clip_ratio"),
    (dict(options={"no_such": 1}), "unknown option"),
    (dict(options={"act_clip_tokens": 0}), "act_clip_tokens"),
    (dict(options={"gptq_target_ridge": -1.0}), "gptq_target_ridge"),
])
def test_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantize_model(tiny_llama(), None, small_config(**kwargs), progress=False)


class LayerNormLike(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.weight * (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)


def test_non_rms_norms_are_refused_by_name():
    model = tiny_llama()
    model.model.layers[1].post_attention_layernorm = LayerNormLike(64)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.post_attention_layernorm.*RMSNorm"):
        quantize_model(model, None, small_config(), progress=False)
    model = tiny_llama()
    model.model.norm.bias = nn.Parameter(torch.zeros(64))
    with pytest.raises(ValueError, match=r"model\.norm.*bias"):
        quantize_model(model, None, small_config(), progress=False)


def test_checkpoint_round_trip(tmp_path):
    from quantkern import io

    model = tiny_llama()
    tokens = ids()
    calib = tmp_path / "calib.txt"
    calib.write_text("THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.\n" * 20)
    # The clip search gives each layer its own clip ratio: the checkpoint must keep them all.
    config = small_config(kv_bits=4, options={"weights": "rtn"}, calib_path=str(calib), calib_samples=4,
                          calib_seq_len=32)
    result = quantize_model(model, ByteTokenizer(), config, progress=False)
    assert len(set(result.extra_config["act_clip_ratios"].values())) > 1
    # Calibration attended to quantized K/V through pre-hooks on the attention modules; none is left.
    assert all(not layer.self_attn._forward_pre_hooks for layer in model.model.layers)
    qconfig = io.quantization_config("quarot", 4, result.group_size, True, act_bits=4, kv_bits=4, rotation="hadamard",
                                     act_clip_ratio=result.extra_config["act_clip_ratio"],
                                     kv_rotate_keys=result.extra_config["kv_rotate_keys"])
    metadata = io.build_metadata(qconfig, "tiny", result.calibration, result.timings_s)
    io.save_quantized(model, tmp_path / "ckpt", qconfig, metadata)
    loaded, _ = io.load_quantized(tmp_path / "ckpt")
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert loaded.model.layers[1].mlp.down_proj.input_rotation == "hadamard"
    assert loaded.model.layers[1].self_attn.o_proj.input_rotation == "hadamard"
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            assert loaded.get_submodule(name).act_clip_ratio == module.act_clip_ratio, name
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


# ----------------------------------------------------------------------------------------------
# The real model, truncated to its first blocks: rotation makes W4A4 far better than plain RTN
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def truncated_smollm(truncated_builtin_model):
    from quantkern.evaluation import DEFAULT_EVAL_TEXT

    model, tokenizer = truncated_builtin_model(2)
    text = open(DEFAULT_EVAL_TEXT, encoding="utf-8").read()
    tokens = tokenizer(text, return_tensors="pt")["input_ids"][:, :128]
    return model, tokenizer, tokens


def kl_per_token(model, reference_logprobs, tokens):
    out = logits(model, tokens).log_softmax(-1)
    return float(F.kl_div(out, reference_logprobs, log_target=True, reduction="sum")) / tokens.numel()


def test_w4a4_quarot_much_better_than_rtn_on_smollm(truncated_smollm):
    # The truncated model's perplexity is meaningless; its output distribution is not: compare
    # each quantized model's KL divergence from the float truncated model.
    model, tokenizer, tokens = truncated_smollm
    reference_logprobs = logits(model, tokens).log_softmax(-1)
    kl = {}
    for method in ("rtn", "quarot"):
        quantized = copy.deepcopy(model)
        options = {"weights": "rtn", "act_clip_search": False} if method == "quarot" else {}
        quantize_model(quantized, tokenizer, small_config(method=method, options=options),
                       progress=False)
        kl[method] = kl_per_token(quantized, reference_logprobs, tokens)
    assert kl["quarot"] < 0.5 * kl["rtn"], kl


@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_clip_search_never_loses_to_rtn_per_row(symmetric):
    from quantkern.quantizers.quarot import WEIGHT_CLIP_NORM, mse_clip_quantize

    generator = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=generator)
    w[:, 7] *= 8.0  # an outlier column: clipping it pays
    for group_size in (-1, 64):
        clipped = reference.dequantize_weight(mse_clip_quantize(w, 4, group_size, symmetric, torch.float16))
        plain = reference.dequantize_weight(reference.quantize_weight(w, 4, group_size, symmetric))
        glen = 256 if group_size == -1 else group_size

        def row_errors(q):
            return (q - w).abs().pow(WEIGHT_CLIP_NORM).reshape(48, -1, glen).sum(-1)

        assert torch.all(row_errors(clipped) <= row_errors(plain) * (1 + 1e-5))
        assert row_errors(clipped).sum() < (0.9 if group_size == -1 else 1.0) * row_errors(plain).sum()


def test_gptq_for_quantized_inputs_lowers_the_error_of_what_runs():
    # Option gptq_quantized_inputs: GPTQ of quantized_input_target against the Hessian of Q(X) minimises
    # ||X W^T - Q(X) W_q^T||^2, the error of the W4A4 layer as it runs; plain GPTQ minimises
    # ||X W^T - X W_q^T||^2. Measured on held-out inputs of the same distribution.
    from quantkern.quantizers.gptq import gptq_quantize
    from quantkern.quantizers.quarot import fake_quantize_tokens, quantized_input_target

    generator = torch.Generator().manual_seed(0)
    spread = torch.linspace(0.2, 2.0, 256)  # channels of different energy, as rotated activations have
    x, held_out = (torch.randn(8192, 256, generator=generator) * spread for _ in range(2))
    w = torch.randn(128, 256, generator=generator) / 16
    xq = fake_quantize_tokens(x, 4, 0.9)

    def error(wq):
        return float((held_out @ w.T - fake_quantize_tokens(held_out, 4, 0.9) @ wq.T).pow(2).sum())

    plain = reference.dequantize_weight(gptq_quantize(w, x.T @ x, 4, -1, True, True))
    target = quantized_input_target(w, xq.T @ xq, x.T @ xq, 0.1)
    fitted = reference.dequantize_weight(gptq_quantize(target, xq.T @ xq, 4, -1, True, True))
    assert error(fitted) < 0.99 * error(plain), (error(fitted), error(plain))  # measured: 0.969
    # Channels the calibration never saw keep their weights (the ridge), instead of shrinking to zero.
    x[:, :32] = 0
    xq = fake_quantize_tokens(x, 4, 0.9)
    target = quantized_input_target(w, xq.T @ xq, x.T @ xq, 0.1)
    torch.testing.assert_close(target[:, :32], w[:, :32])


@pytest.mark.parametrize("options, match", [
    ({"online_hadamard": "False"}, "online_hadamard must be true or false"),  # --option online_hadamard=False
    ({"rotate_keys": "off"}, "rotate_keys must be true or false"),
    ({"gptq_act_order": 0}, "gptq_act_order must be true or false"),
    ({"act_clip_tokens": True}, "act_clip_tokens must be an integer >= 1"),
    ({"gptq_block_size": 0}, "gptq_block_size must be an integer >= 1"),
    ({"gptq_damp": -1}, "gptq_damp must be a finite number > 0"),
])
def test_option_values_are_checked_before_the_model_is_touched(options, match):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"quarot: option {match}"):
        quantize_model(model, None, small_config(options={"weights": "rtn", **options}), progress=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_a_model_without_lm_head_is_refused():
    # Without a head, the final norm's weight is set to 1 with nowhere to fold it, and the residual
    # rotation stays in the outputs (the hidden states changed by ~130% before this was refused).
    with pytest.raises(ValueError, match="quarot: the model has no lm_head"):
        quantize_model(tiny_llama(tie=False).model, None, small_config(), progress=False)


@pytest.mark.parametrize("group_size, act_order, recorded", [(32, True, True), (-1, True, False), (32, False, False)])
def test_the_metadata_records_the_static_groups_that_ran(group_size, act_order, recorded):
    from quantkern.quantizers.quarot import QuaRotQuantizer

    config = small_config(group_size=group_size, options={"gptq_act_order": act_order})
    assert QuaRotQuantizer(config, group_size).extra_config()["options"]["gptq_static_groups"] is recorded


def test_calibration_that_these_settings_do_not_read_is_reported(tmp_path):
    # RTN weights on a Hadamard rotation without a clip search read no data: the file was dropped without a word.
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text that nothing reads\n" * 20)
    with pytest.warns(UserWarning, match="quarot with these settings reads no calibration data"):
        result = quantize_model(tiny_llama(), None, small_config(calib_path=str(calib)), progress=False)
    assert result.calibration is None
