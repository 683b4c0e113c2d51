"""GPTQ as a method: through the block driver on the real SmolLM2, truncated to its first blocks.

The truncated model's perplexity means little; its output distribution does: each quantized copy is
scored by its KL divergence from the float truncated model on GPL-3 tokens, after calibrating on
other license texts. (Full-model perplexities are in the README's accuracy table.)"""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantkern.nn import QuantLinear
from quantkern.quantizers import QuantizeConfig, quantize_model

LICENSES = Path("/usr/share/common-licenses")


@pytest.fixture(scope="module")
def smollm_3_blocks(truncated_builtin_model, tmp_path_factory):
    from quantkern.evaluation import DEFAULT_EVAL_TEXT

    if not (LICENSES / "Apache-2.0").is_file():
        pytest.skip(f"{LICENSES} has no license texts to calibrate on")
    model, tokenizer = truncated_builtin_model(3)
    calib = tmp_path_factory.mktemp("calib") / "calib.txt"
    calib.write_text((LICENSES / "Apache-2.0").read_text() + (LICENSES / "MPL-2.0").read_text())
    tokens = tokenizer(Path(DEFAULT_EVAL_TEXT).read_text(), return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        reference = model(tokens).logits.log_softmax(-1)
    return model, tokenizer, calib, tokens, reference


def kl_per_token(model, tokens, reference) -> float:
    with torch.no_grad():
        out = model(tokens).logits.log_softmax(-1)
    return float(F.kl_div(out, reference, log_target=True, reduction="sum")) / tokens.numel()


def quantized_copy(model, tokenizer, **config):
    quantized = copy.deepcopy(model)
    result = quantize_model(quantized, tokenizer, QuantizeConfig(group_size=64, calib_samples=8, calib_seq_len=256,
                                                                 **config), progress=False)
    return quantized, result


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_the_real_model(smollm_3_blocks, symmetric):
    model, tokenizer, calib, tokens, reference = smollm_3_blocks
    rtn, _ = quantized_copy(model, tokenizer, method="rtn", symmetric=symmetric)
    gptq, result = quantized_copy(model, tokenizer, method="gptq", symmetric=symmetric, calib_path=str(calib))
    kl_rtn, kl_gptq = kl_per_token(rtn, tokens, reference), kl_per_token(gptq, tokens, reference)
    # Measured here: GPTQ's KL is 0.62x RTN's (symmetric) and 0.52x (asymmetric) on these three
    # blocks with 8 windows; a broken GPTQ (no error feedback, wrong Hessian) lands at or above RTN's.
    assert kl_gptq < 0.75 * kl_rtn, (kl_gptq, kl_rtn)
    layers = [m for m in gptq.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 3 * 7 and all(layer.group_size == 64 for layer in layers)
    assert all((layer.zeros is None) == symmetric for layer in layers)
    assert result.calibration["samples"] == 8 and len(result.calibration["sha256"]) == 64
    assert result.extra_config["options"]["act_order"] is True
    assert result.extra_config["options"]["static_groups"] is True  # what act-order with groups runs


@pytest.mark.parametrize("group_size, act_order, recorded", [(64, True, True), (-1, True, False), (64, False, False)])
def test_the_metadata_records_the_static_groups_that_ran(group_size, act_order, recorded):
    # act_order with groups forces static groups (the format has no g_idx); the metadata said False.
    from quantkern.quantizers.gptq import GPTQQuantizer

    config = QuantizeConfig(method="gptq", group_size=group_size, options={"act_order": act_order})
    assert GPTQQuantizer(config, group_size).extra_config()["options"]["static_groups"] is recorded


def test_true_sequential_off_and_static_groups_run(smollm_3_blocks):
    model, tokenizer, calib, tokens, reference = smollm_3_blocks
    rtn, _ = quantized_copy(model, tokenizer, method="rtn")
    gptq, _ = quantized_copy(model, tokenizer, method="gptq", calib_path=str(calib),
                             options={"true_sequential": False, "act_order": False, "static_groups": True})
    assert kl_per_token(gptq, tokens, reference) < 0.9 * kl_per_token(rtn, tokens, reference)


def test_unknown_option_is_refused(smollm_3_blocks):
    model, tokenizer, calib, _, _ = smollm_3_blocks
    with pytest.raises(ValueError, match=r"gptq: unknown option\(s\) \['dampening'\]"):
        quantize_model(copy.deepcopy(model), tokenizer, QuantizeConfig(method="gptq", group_size=64,
                       calib_path=str(calib), options={"dampening": 0.1}), progress=False)


@pytest.mark.parametrize("options, match", [
    ({"act_order": "False"}, "act_order must be true or false"),  # --option act_order=False is not JSON
    ({"true_sequential": "no"}, "true_sequential must be true or false"),
    ({"static_groups": 1}, "static_groups must be true or false"),
    ({"damp": -0.1}, "damp must be a finite number > 0"),
    ({"damp": "abc"}, "damp must be a finite number > 0"),
    ({"damp": float("nan")}, "damp must be a finite number > 0"),
    ({"block_size": 0}, "block_size must be an integer >= 1"),
    ({"block_size": 1.5}, "block_size must be an integer >= 1"),
])
def test_invalid_option_values_are_refused_before_any_work(options, match):
    from quantkern.quantizers.gptq import GPTQQuantizer

    with pytest.raises(ValueError, match=f"gptq: option {match}"):
        GPTQQuantizer(QuantizeConfig(method="gptq", options=options), 64)
    # The CLI's JSON spelling is read as a bool and runs as given.
    quantizer = GPTQQuantizer(QuantizeConfig(method="gptq", group_size=-1, options={"act_order": False}), -1)
    assert quantizer.options["act_order"] is False


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_quantized_activations_with_asymmetric_weights_are_refused_before_any_work(method):
    # QuantLinear refuses zero points with act_bits, but only once the first block had been quantized,
    # leaving that block's weights fake-quantized in place; the driver now refuses up front.
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64)).eval()
    before = copy.deepcopy(model.state_dict())
    windows = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    config = QuantizeConfig(method=method, bits=4, group_size=32, act_bits=8, symmetric=False,
                            kernel_shapes="reference", calib_windows=windows)
    with pytest.raises(ValueError, match="act_bits=8: integer-activation GEMMs need symmetric weights"):
        quantize_model(model, None, config, progress=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
