"""SmoothQuant (quantkern.quantizers.smoothquant): exact folding, W8A8 against RTN W8A8, configuration."""

import copy

import pytest
import torch

from quantkern import reference
from quantkern.models import model_structure
from quantkern.nn import QuantLinear
from quantkern.quantizers import METHODS, QuantizeConfig, quantize_model
from quantkern.quantizers.base import _first_block_inputs
from quantkern.quantizers.smoothquant import SmoothQuantQuantizer, fake_quantize_tokens, smoothing_factors

GPL3 = "/usr/share/common-licenses/GPL-3"
W8A8 = dict(method="smoothquant", bits=8, group_size=-1, act_bits=8)


def tiny_model(kind: str, seed: int = 0):
    """A random 2-block model: "llama" (GQA, 4 query heads on 2 KV heads, no biases) or "qwen2"
    (q/k/v biases, so folding into v_proj's bias is exercised)."""
    import transformers

    torch.manual_seed(seed)
    sizes = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes))
    model.eval()
    with torch.no_grad():  # non-trivial norms, biases and one outlier input channel per block
        for block in model.model.layers:
            block.input_layernorm.weight.uniform_(0.5, 1.5)
            block.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            block.input_layernorm.weight[3] = 20.0
            block.post_attention_layernorm.weight[7] = 20.0
            for proj in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj):
                if proj.bias is not None:
                    proj.bias.normal_()
    return model


class _CharTokenizer:
    """Enough of a tokenizer for calibration windows of the tiny models (vocabulary of 96)."""

    def __call__(self, text, return_tensors=None):
        return {"input_ids": torch.tensor([[min(ord(c), 127) % 96 for c in text]])}


@pytest.fixture(scope="module")
def smollm_4_blocks(truncated_builtin_model):
    return truncated_builtin_model(4)


def smooth_every_block(model, windows, alpha=0.5):
    """Run SmoothQuant's smoothing (no quantization) on every block of ``model``, in place."""
    structure = model_structure(model)
    quantizer = SmoothQuantQuantizer(QuantizeConfig(**W8A8, options={"alpha": alpha}), -1)
    quantizer.check(structure)
    runner = _first_block_inputs(structure, windows, "cpu")
    used = []
    for block in structure.blocks:
        used.append(quantizer.smooth_block(block, runner))
        runner.inputs = runner.run(block.module, keep_outputs=True)
    return used


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("alpha", [0.5, 0.9, "auto"])
def test_smoothing_leaves_the_float_model_unchanged(kind, alpha):
    model = tiny_model(kind, seed=1)
    windows = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(2))
    test_ids = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(3))
    smoothed = copy.deepcopy(model)
    used = smooth_every_block(smoothed, windows, alpha)
    assert [set(u) for u in used] == [{"qkv", "o", "gate_up", "down"}] * 2
    block, original = smoothed.model.layers[0], model.model.layers[0]
    # The factors are not trivial: the norms and Linears did change ...
    assert relative_error(block.input_layernorm.weight, original.input_layernorm.weight) > 0.1
    assert relative_error(block.mlp.down_proj.weight, original.mlp.down_proj.weight) > 0.1
    assert relative_error(block.self_attn.o_proj.weight, original.self_attn.o_proj.weight) > 0.1
    if kind == "qwen2":
        assert relative_error(block.self_attn.v_proj.bias, original.self_attn.v_proj.bias) > 0.1
    # ... yet the model computes the same function, up to fp32 rounding.
    with torch.no_grad():
        assert relative_error(smoothed(test_ids).logits, model(test_ids).logits) < 1e-5


def test_smoothing_leaves_smollm2_unchanged(smollm_4_blocks):
    model, tok = smollm_4_blocks
    model = copy.deepcopy(model)
    model.model.layers = model.model.layers[:2]  # 9 query heads on 3 KV heads: GQA folding
    ids = tok(open(GPL3).read(), return_tensors="pt")["input_ids"][0][:256].reshape(2, 128)
    with torch.no_grad():
        reference_out = model.model(ids).last_hidden_state
    smooth_every_block(model, ids[:, :96])
    with torch.no_grad():
        assert relative_error(model.model(ids).last_hidden_state, reference_out) < 1e-5


def test_smoothing_factors():
    act = torch.tensor([4.0, 1.0, 0.0, 9.0])
    weight = torch.tensor([1.0, 4.0, 2.0, 0.0])
    s = smoothing_factors(act, weight, 0.5)
    # alpha 0.5 equalizes the two maxima: a / s == w * s (where neither is zero).
    assert torch.allclose((act / s)[:2], (weight * s)[:2])
    assert (s > 0).all() and torch.isfinite(s).all()  # zero maxima are floored, never divided by
    assert torch.equal(smoothing_factors(act, weight, 0.0)[:2], 1 / weight[:2])
    assert torch.equal(smoothing_factors(act, weight, 1.0)[:2], act[:2])


@pytest.mark.parametrize("alpha", [1.0, 0.9])
def test_smoothing_that_overflows_fp16_is_an_error_that_leaves_the_block_alone(alpha):
    """ReLU neurons never active in calibration get factors near EPS ** alpha: dividing up_proj's rows
    by them overflowed fp16 (inf weights; before, only RTN's "weight row 0 ... holds a NaN or inf weight")."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      hidden_act="relu")
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        mlp.gate_proj.weight[:8] = 0  # relu(0) = 0: dead neurons, so down_proj input channels 0-7 are zero
        mlp.up_proj.weight.mul_(40)  # up_proj rows of magnitude about 1: / 1e-5 is beyond fp16
    model = model.half()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    message = r"overflows the weights of \['model\.layers\.0\.mlp\.up_proj'\] in torch.float16"
    with pytest.raises(ValueError, match=message):
        quantize_model(model, None, QuantizeConfig(**W8A8, calib_windows=windows, kernel_shapes="reference",
                                                   options={"alpha": alpha}), progress=False)
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())


def test_fake_quantize_tokens_matches_the_reference_per_token_quantizer():
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0)) * 3
    q, scale = reference.quantize_per_token(x, 8)
    assert torch.allclose(fake_quantize_tokens(x), reference.dequantize_per_token(q, scale, 8), atol=0, rtol=1e-6)


def output_error(model, tok, calib, **config):
    """Relative MSE of the truncated model's last hidden state after quantization, on GPL-3, with every
    QuantLinear running through the reference W8A8 path (per-token int8 activations)."""
    ids = tok(open(GPL3).read(), return_tensors="pt")["input_ids"][0][:512].reshape(2, 256)
    with torch.no_grad():
        ref = model.model(ids).last_hidden_state
    quantized = copy.deepcopy(model)
    calib = None if config.get("method") == "rtn" else calib  # (RTN reads none)
    result = quantize_model(quantized, tok, QuantizeConfig(calib_path=calib, calib_samples=4, calib_seq_len=256,
                                                           **config), progress=False)
    with torch.no_grad():
        out = quantized.model(ids).last_hidden_state
    return float((out - ref).pow(2).mean() / ref.pow(2).mean()), quantized, result


def test_smoothquant_w8a8_beats_rtn_w8a8_on_a_truncated_smollm2(smollm_4_blocks, calibration_file):
    model, tok = smollm_4_blocks
    rtn, _, _ = output_error(model, tok, calibration_file, **{**W8A8, "method": "rtn"})
    smooth, quantized, result = output_error(model, tok, calibration_file, **W8A8)
    # Measured: SmoothQuant about 0.5x of RTN's error (the down_proj inputs of blocks 1-2 hold
    # outlier channels of 40-70 against a median of 1).
    assert smooth < 0.75 * rtn, (smooth, rtn)
    # The result is W8A8 everywhere: per-channel int8 weights, per-token int8 activations.
    for block in quantized.model.layers:
        for layer in (block.self_attn.q_proj, block.self_attn.o_proj, block.mlp.down_proj):
            assert isinstance(layer, QuantLinear)
            assert (layer.bits, layer.act_bits, layer.group_size) == (8, 8, -1)
    assert result.extra_config["alphas"] == [{"qkv": 0.5, "o": 0.5, "gate_up": 0.5, "down": 0.5}] * 4
    # On CPU the layer runs the reference integer path.
    layer = quantized.model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features)
    assert torch.equal(layer(x), reference.quantized_activation_linear(x, layer.weight, 8))


def test_alpha_auto_end_to_end_on_a_tiny_model(calibration_file):
    model = tiny_model("llama", seed=4)
    result = quantize_model(model, _CharTokenizer(), QuantizeConfig(
        **W8A8, calib_path=calibration_file, calib_samples=2, calib_seq_len=32, options={"alpha": "auto",
                                                                              "alpha_grid": [0.0, 0.5, 1.0]}),
        progress=False)
    alphas = result.extra_config["alphas"]
    assert len(alphas) == 2 and all(set(a) == {"qkv", "o", "gate_up", "down"} for a in alphas)
    assert all(a in (0.0, 0.5, 1.0) for block in alphas for a in block.values())
    # An outlier channel of 20 in the norms: some migration (alpha > 0) beats none for the norm-fed groups.
    assert all(block["qkv"] > 0 and block["gate_up"] > 0 for block in alphas)
    assert all(isinstance(b.mlp.up_proj, QuantLinear) and b.mlp.up_proj.act_bits == 8 for b in model.model.layers)


def test_w4a8_with_groups_is_accepted(calibration_file):
    model = tiny_model("llama", seed=5)
    quantize_model(model, _CharTokenizer(), QuantizeConfig(method="smoothquant", bits=4, group_size=32, act_bits=8,
                                                           calib_path=calibration_file, calib_samples=2, calib_seq_len=32),
                   progress=False)
    layer = model.model.layers[0].self_attn.q_proj
    assert (layer.bits, layer.act_bits, layer.group_size) == (4, 8, 32)


def test_smoothquant_is_registered():
    assert METHODS["smoothquant"] is SmoothQuantQuantizer
    assert SmoothQuantQuantizer.needs_calibration


@pytest.mark.parametrize("config,match", [
    (dict(act_bits=None), "act_bits=8"),
    (dict(act_bits=4), "act_bits=8"),
    (dict(group_size=32), "group_size=-1"),
    (dict(symmetric=False), "symmetric"),
    (dict(kv_bits=8), "KV cache"),
    (dict(options={"alpha": 1.5}), "alpha"),
    (dict(options={"alpha": "best"}), "alpha"),
    (dict(options={"alpha_grid": []}), "alpha_grid"),
    (dict(options={"beta": 1}), "unknown option"),
])
def test_bad_configurations_raise(config, match, calibration_file):
    model = tiny_model("llama")
    full = {**W8A8, "calib_path": calibration_file, "kernel_shapes": "reference", **config}
    with pytest.raises(ValueError, match=match):
        quantize_model(model, _CharTokenizer(), QuantizeConfig(**full), progress=False)


@pytest.mark.parametrize("options,match", [
    ({"smooth_o_proj": "False"}, "smooth_o_proj must be true or false"),  # --option smooth_o_proj=False
    ({"smooth_down_proj": 0}, "smooth_down_proj must be true or false"),
    ({"auto_tokens": "x"}, "auto_tokens must be an integer >= 1"),
    ({"auto_tokens": 0}, "auto_tokens must be an integer >= 1"),
    ({"alpha": True}, "alpha must be a number"),
    ({"alpha_grid": [0.5, True]}, "alpha_grid"),
    ({"alpha_grid": "0.5"}, "alpha_grid"),
])
def test_bad_option_values_raise_at_construction(options, match):
    with pytest.raises(ValueError, match=match):
        SmoothQuantQuantizer(QuantizeConfig(**W8A8, options=options), -1)


def test_norms_that_do_not_scale_by_their_weight_are_refused_before_any_work(calibration_file):
    # Gemma's RMSNorm computes x / rms(x) * (1 + weight): dividing its weight by s does not divide its
    # output by s, and the smoothing silently changed the model (relative logit change ~1 on a tiny Gemma).
    import transformers

    from quantkern.models import UnsupportedModelError

    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64)).eval()
    before = copy.deepcopy(model.state_dict())
    full = {**W8A8, "calib_path": calibration_file, "kernel_shapes": "reference"}
    with pytest.raises(UnsupportedModelError, match=r"smoothquant: model\.layers\.0\.input_layernorm: "
                                                    r"GemmaRMSNorm does not scale its output by its weight"):
        quantize_model(model, _CharTokenizer(), QuantizeConfig(**full), progress=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_norm_fold_check_accepts_rms_and_layer_norms():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from quantkern.quantizers.base import check_norm_folds

    layer_norm = torch.nn.LayerNorm(64)
    with torch.no_grad():
        layer_norm.bias.normal_()
    for norm in (LlamaRMSNorm(64), layer_norm):
        saved = [p.detach().clone() for p in norm.parameters()]
        check_norm_folds(norm, "norm", "smoothquant")  # no error
        assert all(torch.equal(p, s) for p, s in zip(norm.parameters(), saved))
