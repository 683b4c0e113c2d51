"""Importing llm-compressor's compressed-tensors checkpoints (quantkern.convert), on the CPU.

As in tests/test_convert.py, the sources are written here from a quantkern-quantized random Llama, in
compressed-tensors' layout (re-implemented in this file from that format, independently of the converter): signed
values stored plus 2^(bits-1); 4-bit weights packed eight to an int32 word along K (``weight_packed [N, K/8]``),
zero points packed along N (``weight_zero_point [N/8, G]``); 8-bit weights as the int8 ``weight`` itself. The
converted model must compute exactly what the quantkern model computed, activation quantization included.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from test_convert import IDS, TINY_LLAMA, logits, pack_along_last
from transformers import LlamaForCausalLM

from quantkern import replace_linear
from quantkern.convert import UnsupportedCheckpointError, convert_checkpoint
from quantkern.io import load_quantized, read_metadata, read_quantization_config
from quantkern.nn import QuantLinear


def scheme(bits=4, group_size=128, symmetric=True, act_bits=None, fmt="pack-quantized", **weight_changes):
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric, "dynamic": False,
               "strategy": "channel" if group_size == -1 else "group",
               "group_size": None if group_size == -1 else group_size, "actorder": None, "observer": "minmax"}
    weights.update(weight_changes)
    inputs = None if act_bits is None else {"num_bits": act_bits, "type": "int", "symmetric": True,
                                            "dynamic": True, "strategy": "token", "group_size": None}
    return {"targets": ["Linear"], "weights": weights, "input_activations": inputs, "output_activations": None,
            "format": fmt}


def write_compressed_tensors(model, directory, qconfig_changes=None, packed_zero_points=True, tensor_changes=None):
    """The quantkern model ``model`` written as a compressed-tensors checkpoint (its first QuantLinear's settings)."""
    directory.mkdir()
    tensors, first = {}, None
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        first = first or module
        qw = module.weight
        offset = 2 ** (qw.bits - 1)
        codes = qw.codes()  # [N, K] unsigned: the signed value plus offset, as compressed-tensors stores it
        if qw.bits == 4:
            tensors[f"{name}.weight_packed"] = pack_along_last(codes)  # [N, K/8]
            tensors[f"{name}.weight_shape"] = torch.tensor([qw.out_features, qw.in_features])
        else:
            tensors[f"{name}.weight"] = (codes.to(torch.int16) - offset).to(torch.int8)
        tensors[f"{name}.weight_scale"] = qw.scales.clone()  # [N, G]
        if not qw.symmetric:
            zeros = qw.zero_codes()  # [N, G] unsigned
            if packed_zero_points:
                tensors[f"{name}.weight_zero_point"] = pack_along_last(zeros.t().contiguous()).t().contiguous()
            else:
                tensors[f"{name}.weight_zero_point"] = (zeros.to(torch.int16) - offset).to(torch.int8)
    for name, param in model.named_parameters():
        tensors[name] = param.detach().to(torch.float16).contiguous()
    tensors.update(tensor_changes or {})
    qconfig = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
               "config_groups": {"group_0": scheme(first.bits, first.group_size, first.weight.symmetric,
                                                   first.act_bits,
                                                   "pack-quantized" if first.bits == 4 else "int-quantized")},
               "ignore": ["lm_head"], "kv_cache_scheme": None, "sparsity_config": {}}
    qconfig.update(qconfig_changes or {})
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def quantized_llama(bits=4, group_size=128, symmetric=True, act_bits=None):
    torch.manual_seed(0)
    model = LlamaForCausalLM(TINY_LLAMA).eval()
    with torch.no_grad():  # one row of one layer all positive: with zero points, its zero codes are 0
        model.model.layers[0].mlp.up_proj.weight[0].abs_()
    return replace_linear(model, bits=bits, group_size=group_size, symmetric=symmetric, act_bits=act_bits)


@pytest.mark.parametrize("bits, group_size, symmetric, act_bits, packed_zero_points, tag", [
    (4, 128, True, None, True, "CompressedTensors_w4_g128_headfp16"),   # llm-compressor's W4A16 (GPTQ, RTN)
    (4, 32, False, None, True, "CompressedTensors_w4_g32_headfp16"),    # asymmetric (AWQ), packed zero points
    (4, -1, False, None, False, "CompressedTensors_w4_pc_headfp16"),    # older: one int8 zero point per group
    (4, 128, True, 8, True, "CompressedTensors_w4_g128_a8_headfp16"),   # W4A8: int8 per-token activations
    (8, -1, True, 8, True, "CompressedTensors_w8_pc_a8_headfp16"),      # W8A8 (SmoothQuant + GPTQ recipes)
    (4, -1, True, 4, True, "CompressedTensors_w4_pc_a4_headfp16"),      # W4A4
])
def test_converted_model_computes_what_the_source_computes(tmp_path, bits, group_size, symmetric, act_bits,
                                                           packed_zero_points, tag):
    model = quantized_llama(bits, group_size, symmetric, act_bits)
    src = write_compressed_tensors(model, tmp_path / "src", packed_zero_points=packed_zero_points)
    dst = convert_checkpoint(src, tmp_path / "dst")
    converted, _ = load_quantized(dst)
    for param in model.parameters():  # the source's unquantized tensors were fp16
        param.data = param.data.half().float()
    assert torch.equal(logits(converted, IDS), logits(model, IDS))
    layer = converted.model.layers[1].mlp.down_proj
    assert (layer.bits, layer.group_size, layer.act_bits) == (bits, group_size, act_bits)
    qconfig = read_quantization_config(dst)["quantization_config"]
    assert (qconfig["method"], qconfig["symmetric"], qconfig["act_bits"]) == ("compressed-tensors", symmetric,
                                                                              act_bits)
    metadata = read_metadata(dst)
    assert metadata["tag"] == tag
    assert metadata["method_config"]["imported_from"]["layout"] == ("pack-quantized" if bits == 4 else
                                                                    "int-quantized")


def test_act_order_group_g_idx_gives_an_input_permutation(tmp_path):
    # Older llm-compressor GPTQ with actorder "group" stored weight_g_idx (input channel -> its group), as GPTQ's
    # g_idx: here each layer's groups are a random regrouping of its input channels.
    model = quantized_llama(4, 32, symmetric=True)
    changes, permutations = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            k = module.in_features
            order = torch.randperm(k)  # stored column j is input channel order[j]; groups of stored columns
            permutations[name] = order
            codes = module.weight.codes()
            stored = torch.empty_like(codes)
            stored[:, order] = codes  # input channel order[j] holds what column j held
            g_idx = torch.empty(k, dtype=torch.int32)
            g_idx[order] = (torch.arange(k) // 32).to(torch.int32)
            changes[f"{name}.weight_packed"] = pack_along_last(stored)
            changes[f"{name}.weight_g_idx"] = g_idx
    src = write_compressed_tensors(model, tmp_path / "src", tensor_changes=changes)
    converted, _ = load_quantized(convert_checkpoint(src, tmp_path / "dst"))
    name = "model.layers.0.self_attn.o_proj"
    layer = converted.model.layers[0].self_attn.o_proj
    assert layer.input_permutation is not None
    # The source computes sum_j W[:, j] x[order[j]] (input channel order[j] holds column j): W x[order].
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        expected = model.model.layers[0].self_attn.o_proj(x[:, permutations[name]])
        assert torch.allclose(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("qconfig_changes, message", [
    ({"quantization_status": "frozen"}, "quantization_status 'frozen'"),
    ({"kv_cache_scheme": {"num_bits": 8, "type": "float"}}, "KV cache scheme"),
    ({"sparsity_config": {"format": "sparse-24-bitmask"}}, "sparsity format 'sparse-24-bitmask'"),
    ({"config_groups": {"g": scheme(8, -1, fmt="float-quantized", type="float")}}, "format 'float-quantized'"),
    ({"config_groups": {"g": scheme(4, 128, type="float")}}, "float weights"),
    ({"config_groups": {"g": scheme(4, 128, strategy="tensor")}}, "weight strategy 'tensor'"),
    ({"config_groups": {"g": scheme(4, 256)}}, "group_size 256"),
    ({"config_groups": {"g": scheme(8, -1, fmt="int-quantized")}}, "8-bit weights \\(weight-only\\)"),
    ({"config_groups": {"g": scheme(4, 128, symmetric=False, act_bits=8)}}, "asymmetric weights with quantized"),
    ({"config_groups": {"a": scheme(4, 128), "b": scheme(4, 64)}}, "config groups with different schemes"),
])
def test_schemes_quantkern_cannot_run_as_the_source_does_are_refused(tmp_path, qconfig_changes, message):
    src = write_compressed_tensors(quantized_llama(), tmp_path / "src", qconfig_changes=qconfig_changes)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        convert_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_static_activation_scales_are_refused(tmp_path):
    group = scheme(8, -1, act_bits=8, fmt="int-quantized")
    group["input_activations"].update(dynamic=False, strategy="tensor")
    src = write_compressed_tensors(quantized_llama(8, -1, act_bits=8), tmp_path / "src",
                                   qconfig_changes={"config_groups": {"g": group}})
    with pytest.raises(UnsupportedCheckpointError, match="per token, symmetric and dynamic"):
        convert_checkpoint(src, tmp_path / "dst")


def test_broken_layer_tensors_are_refused_with_the_layer_named(tmp_path):
    model = quantized_llama()
    name = "model.layers.1.mlp.up_proj"
    for tensor_changes, message in [({f"{name}.weight_shape": torch.tensor([256, 64])}, "weight_shape \\[256, 64\\]"),
                                    ({f"{name}.weight_scale": torch.ones(256, 3, dtype=torch.float16)},
                                     "weight_scale has shape \\(256, 3\\)"),
                                    ({f"{name}.weight_packed": torch.zeros(256, 16, dtype=torch.int64)},
                                     "weight_packed is torch.int64")]:
        directory = tmp_path / f"src{len(message)}"
        src = write_compressed_tensors(model, directory, tensor_changes=tensor_changes)
        with pytest.raises(UnsupportedCheckpointError, match=f"{name} .*{message}"):
            convert_checkpoint(src, tmp_path / "dst")


def test_cli_says_what_it_converted(tmp_path, capsys):
    from quantkern.cli import main

    src = write_compressed_tensors(quantized_llama(8, -1, act_bits=8), tmp_path / "src")
    assert main(["convert", str(src), "--dst", str(tmp_path / "dst")]) == 0
    out = capsys.readouterr().out
    assert ("[CompressedTensors_w8_pc_a8_headfp16] converted 14 layers of" in out
            and "(compressed-tensors int-quantized, group size -1, symmetric, int8 activations per token)" in out)


def test_the_built_in_smollm2_as_w8a8_compressed_tensors(builtin_model_available, tmp_path):
    # The real architecture (576-wide layers, tied embeddings, a tokenizer) through the int-quantized path.
    from quantkern.builtin_model import load_builtin_model

    model, tokenizer = load_builtin_model(dtype=torch.float32)
    replace_linear(model, bits=8, group_size=-1, act_bits=8)
    src = write_compressed_tensors(model, tmp_path / "src")
    tokenizer.save_pretrained(str(src))
    converted, converted_tokenizer = load_quantized(convert_checkpoint(src, tmp_path / "dst"))
    for param in model.parameters():
        param.data = param.data.half().float()
    ids = converted_tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(logits(converted, ids), logits(model, ids))


def test_an_unpacked_zero_point_outside_the_4_bit_range_is_refused(tmp_path):
    name = "model.layers.0.mlp.up_proj"
    out_of_range = {f"{name}.weight_zero_point": torch.full((256, 1), 9, dtype=torch.int8)}  # int4 holds -8..7
    src = write_compressed_tensors(quantized_llama(4, -1, symmetric=False), tmp_path / "src", packed_zero_points=False,
                                   tensor_changes=out_of_range)
    with pytest.raises(UnsupportedCheckpointError, match=f"{name} .*weight_zero_point holds values outside the 4-bit"):
        convert_checkpoint(src, tmp_path / "dst")
