"""Importing GPTQ and AWQ checkpoints (quantkern.convert, `quantkern convert`), on the CPU.

The sources are written here from a quantkern-quantized random Llama, packed the way auto-gptq / GPTQModel and
AutoAWQ pack (their layouts re-implemented in this file, independently of the converter's unpacking), so the
converted model must compute exactly what the quantkern model computed.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from quantkern import fuse_projections, reference, replace_linear
from quantkern.cli import main
from quantkern.convert import UnsupportedCheckpointError, convert_checkpoint
from quantkern.io import load_quantized, read_metadata, read_quantization_config
from quantkern.nn import QuantLinear

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words of 32 bits -> int32 with the same bits (two's complement)."""
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def pack_along_last(codes: torch.Tensor, order=range(8)) -> torch.Tensor:
    """uint8 codes [..., 8 W] -> int32 [..., W]: nibble i of word w holds element 8 w + order[i]."""
    grouped = codes.to(torch.int64).reshape(*codes.shape[:-1], -1, 8)
    words = sum(grouped[..., j] << (4 * i) for i, j in enumerate(order))
    return to_int32(words)


TINY_LLAMA = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)


def quantized_llama(symmetric: bool, group_size: int, seed: int = 0):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(TINY_LLAMA).eval()
    with torch.no_grad():  # one row of one layer all positive: with zero points, its zero codes are 0
        model.model.layers[0].mlp.up_proj.weight[0].abs_()
    replace_linear(model, bits=4, group_size=group_size, symmetric=symmetric)
    return model


def write_source(model, directory, fmt: str, *, layout=None, g_idx=None, shards=1, extra_config=None):
    """The quantkern model `model` written as a GPTQ or AWQ checkpoint in `directory`."""
    directory.mkdir()
    tensors, group_size = {}, None
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            qw = module.weight
            group_size = qw.group_size
            codes, zeros = qw.codes(), qw.zero_codes().to(torch.int64)  # [N, K], [N, G]
            scales = qw.scales.t().contiguous()  # [G, N]
            if fmt == "gptq":
                tensors[f"{name}.qweight"] = pack_along_last(codes).t().contiguous()  # [K/8, N]: word r of
                # column n holds input channels 8r..8r+7
                qzeros = pack_along_last(zeros.t().contiguous().to(torch.uint8))
                if (layout or "gptq") == "gptq":  # v1: each word minus 0x11111111 (GPTQModel's v2 -> v1)
                    qzeros = to_int32(qzeros.to(torch.int64) - 0x11111111)
                tensors[f"{name}.qzeros"] = qzeros
                k = qw.in_features
                index = torch.arange(k) // (k if group_size == -1 else group_size)
                tensors[f"{name}.g_idx"] = (g_idx(index) if g_idx else index).to(torch.int32)
            else:
                tensors[f"{name}.qweight"] = pack_along_last(codes.t().contiguous(), AWQ_ORDER)  # [K, N/8]
                tensors[f"{name}.qzeros"] = pack_along_last(zeros.t().contiguous().to(torch.uint8), AWQ_ORDER)
            tensors[f"{name}.scales"] = scales
    for name, param in model.named_parameters():
        tensors[name] = param.detach().to(torch.float16).contiguous()
    if fmt == "gptq":
        qconfig = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": g_idx is not None,
                   "sym": True, "checkpoint_format": layout or "gptq"}
    else:
        qconfig = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                   "version": layout or "gemm"}
    qconfig.update(extra_config or {})
    qconfig = {key: value for key, value in qconfig.items() if value is not None}
    config = model.config.to_dict()
    config["quantization_config"] = qconfig
    (directory / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for shard in range(shards):
            file = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {name: tensors[name] for name in names[shard::shards]}
            save_file(part, str(directory / file))
            weight_map.update(dict.fromkeys(part, file))
        (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 41, 88]])


@pytest.mark.parametrize("fmt, layout, symmetric, group_size, shards", [
    ("gptq", "gptq", False, 32, 1),      # v1: stored zero - 1, a zero of 0 (borrowing) among them
    ("gptq", "gptq_v2", False, 64, 2),   # v2: the zeros themselves; two shards and an index
    ("gptq", "gptq", True, -1, 1),       # symmetric per-channel: every zero 8, stored as none
    ("awq", "gemm", False, 128, 1),
    ("awq", "gemm", True, 32, 2),
    ("awq", "GEMM", False, 64, 1),     # AutoAWQ's own spelling of the config (below)
])
def test_converted_model_computes_what_the_source_computes(tmp_path, fmt, layout, symmetric, group_size, shards):
    model = quantized_llama(symmetric, group_size)
    renamed = {"bits": None, "group_size": None, "w_bit": 4, "q_group_size": group_size} if layout == "GEMM" else {}
    src = write_source(model, tmp_path / "src", fmt, layout=layout, shards=shards, extra_config=renamed)
    dst = convert_checkpoint(src, tmp_path / "dst")
    converted, _ = load_quantized(dst)
    # The source's unquantized tensors were fp16: compare with the quantkern model rounded the same way.
    for param in model.parameters():
        param.data = param.data.half().float()
    assert torch.equal(logits(converted, IDS), logits(model, IDS))
    qconfig = read_quantization_config(dst)["quantization_config"]
    assert (qconfig["method"], qconfig["group_size"], qconfig["symmetric"]) == (fmt, group_size, symmetric)
    assert qconfig["modules_not_converted"] == ["lm_head"]
    metadata = read_metadata(dst)
    assert metadata["tag"] == f"{fmt.upper()}_w4_{'pc' if group_size == -1 else f'g{group_size}'}_headfp16"
    assert metadata["method_config"]["imported_from"]["layout"] == layout.lower()


def write_act_order_gptq(directory, mlp_bias: bool = False):
    """A GPTQ act-order checkpoint (asymmetric, group 32) of a random tiny Llama, written in ``directory``;
    returns the float model computing what the source's dequantized weights compute (its other tensors rounded
    to fp16, as stored).

    GPTQ's act-order: each layer's columns quantized in an order of its own (q/k/v share one, as they share their
    input; gate/up another), the groups contiguous in that order, g_idx saying where each input channel went."""
    torch.manual_seed(1)
    config = TINY_LLAMA.to_dict()
    config["mlp_bias"] = mlp_bias
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    tensors, orders = {}, {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or name == "lm_head":
            continue
        parent, role = name.rsplit(".", 1)
        shared_input = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
        k = module.in_features
        order = orders.setdefault(f"{parent}.{shared_input.get(role, role)}", torch.randperm(k))
        qw = reference.quantize_weight(module.weight.detach()[:, order], 4, 32, symmetric=False,
                                       scale_dtype=torch.float16)
        codes = torch.empty_like(qw.codes())
        codes[:, order] = qw.codes()
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[order] = (torch.arange(k) // 32).to(torch.int32)
        tensors.update({f"{name}.qweight": pack_along_last(codes).t().contiguous(), f"{name}.g_idx": g_idx,
                        f"{name}.qzeros": pack_along_last(qw.zero_codes().t().contiguous()),
                        f"{name}.scales": qw.scales.t().contiguous()})
        with torch.no_grad():  # the float model now computes what the source's dequantized weights compute
            module.weight.copy_(reference.dequantize_weight(qw).float()[:, torch.argsort(order)])
            if module.bias is not None:
                module.bias.normal_()
                tensors[f"{name}.bias"] = module.bias.half()
                module.bias.copy_(module.bias.half().float())
    for name, param in model.named_parameters():
        if f"{name.rsplit('.', 1)[0]}.qweight" not in tensors:
            tensors[name] = param.detach().half()
            param.data = param.data.half().float()
    directory.mkdir()
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
                                     "sym": False, "checkpoint_format": "gptq_v2"}
    (directory / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(directory / "model.safetensors"))
    return model


@pytest.mark.parametrize("mlp_bias", [False, True])
def test_act_order_gptq_converts_with_an_input_permutation(tmp_path, mlp_bias):
    model = write_act_order_gptq(tmp_path / "src", mlp_bias)
    dst = convert_checkpoint(tmp_path / "src", tmp_path / "dst")
    converted, _ = load_quantized(dst)
    for layer in converted.model.layers:
        assert layer.self_attn.q_proj.input_permutation is not None
        assert layer.self_attn.o_proj.input_permutation is not None
        assert layer.mlp.up_proj.input_permutation is not None
        # down_proj's order is in gate/up's output channels instead: it reads its input as it comes.
        assert layer.mlp.down_proj.input_permutation is None
        assert (layer.mlp.gate_proj.bias is not None) == mlp_bias
    imported = read_metadata(dst)["method_config"]["imported_from"]
    assert (imported["input_permutations"], imported["down_proj_permutations_folded"]) == (12, 2)
    expected = logits(model, IDS)
    assert torch.allclose(logits(converted, IDS), expected, rtol=1e-4, atol=1e-4)  # (sums in another order)
    report = fuse_projections(converted)  # q/k/v (and gate/up) share their order: still one GEMM each
    assert len(report["fused"]) == 4 and not report["skipped"]
    assert torch.allclose(logits(converted, IDS), expected, rtol=1e-4, atol=1e-4)


def test_cli_says_how_many_layers_gather_their_input(tmp_path, capsys):
    write_act_order_gptq(tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), "--dst", str(tmp_path / "dst")]) == 0
    assert "act-order: 12 layers gather their input once per call" in capsys.readouterr().out


def test_a_g_idx_that_is_not_groups_of_group_size_is_refused_and_nothing_is_written(tmp_path):
    def uneven(index):
        index = index.clone()
        index[0] = 1  # group 1 one channel too many, group 0 one too few
        return index
    src = write_source(quantized_llama(False, 32), tmp_path / "src", "gptq", g_idx=uneven)
    with pytest.raises(UnsupportedCheckpointError, match="does not give each of the 4 groups 32 input channels"):
        convert_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize("change, message", [
    ({"bits": 8}, "8-bit weights"),
    ({"checkpoint_format": "marlin"}, "packed for another kernel"),
    ({"quant_method": "quantkern"}, "quantkern checkpoint already"),
    ({"quant_method": "bitsandbytes"}, "not one this converter reads"),
    ({"group_size": 256}, "group_size 256"),
    ({"pack_dtype": "int8"}, "pack_dtype 'int8'"),  # GPTQModel: codes packed into int8 words, not int32
    ({"is_marlin_format": True}, "checkpoint_format 'marlin'"),  # auto-gptq's older spelling
    ({"dynamic": {r"+:.*down_proj": {"bits": 8}}}, r"matching '\+:\.\*down_proj' are quantized with \{'bits': 8\}"),
    ({"dynamic": {r".*\.mlp\..*": {"group_size": 64}}}, r"quantized with \{'group_size': 64\}"),
])
def test_other_formats_are_refused_with_the_reason(tmp_path, change, message):
    src = write_source(quantized_llama(True, 32), tmp_path / "src", "gptq", extra_config=change)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        convert_checkpoint(src, tmp_path / "dst")


def test_gptqmodel_dynamic_rules_that_keep_the_settings_or_skip_layers_convert(tmp_path):
    # GPTQModel's "dynamic": per-layer overrides by regex. Ones that repeat the checkpoint's settings change nothing,
    # and "-:" rules leave layers in floating point (found as such by their tensors); pack_dtype int32 is the default.
    torch.manual_seed(0)
    model = replace_linear(LlamaForCausalLM(TINY_LLAMA).eval(), bits=4, group_size=32, skip=("lm_head", "down_proj"))
    dynamic = {r"-:.*down_proj": {}, r"+:.*q_proj": {"bits": 4, "group_size": 32, "desc_act": True}}
    src = write_source(model, tmp_path / "src", "gptq", extra_config={"dynamic": dynamic, "pack_dtype": "int32"})
    converted, _ = load_quantized(convert_checkpoint(src, tmp_path / "dst"))
    assert type(converted.model.layers[0].mlp.down_proj) is torch.nn.Linear
    for param in model.parameters():
        param.data = param.data.half().float()
    assert torch.equal(logits(converted, IDS), logits(model, IDS))


def test_awq_gemv_and_broken_sources_are_refused(tmp_path):
    model = quantized_llama(False, 32)
    src = write_source(model, tmp_path / "gemv", "awq", layout="gemv")
    with pytest.raises(UnsupportedCheckpointError, match="AWQ version 'gemv'"):
        convert_checkpoint(src, tmp_path / "dst")
    src = write_source(model, tmp_path / "llm-awq", "awq", extra_config={"backend": "llm-awq"})  # another packing
    with pytest.raises(UnsupportedCheckpointError, match="AWQ version 'llm-awq' is packed for another kernel"):
        convert_checkpoint(src, tmp_path / "dst")
    src = write_source(model, tmp_path / "no-zeros", "awq")
    from safetensors.torch import load_file

    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.self_attn.o_proj.qzeros"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(UnsupportedCheckpointError, match="o_proj .*missing qzeros"):
        convert_checkpoint(src, tmp_path / "dst")
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt"):
        convert_checkpoint(src, tmp_path / "dst")
    with pytest.raises(FileNotFoundError):
        convert_checkpoint(tmp_path / "nowhere", tmp_path / "dst")


def test_cli_convert_then_refuses_to_overwrite_without_asking(tmp_path, capsys):
    src = write_source(quantized_llama(False, 64), tmp_path / "src", "awq")
    assert main(["convert", str(src), "--dst", str(tmp_path / "dst")]) == 0
    out = capsys.readouterr().out
    assert "[AWQ_w4_g64_headfp16] converted 14 layers of" in out
    assert "(awq gemm, group size 64, with zero points)" in out
    assert "act-order" not in out
    assert main(["convert", str(src), "--dst", str(tmp_path / "dst")]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["convert", str(src), "--dst", str(tmp_path / "dst"), "--overwrite"]) == 0


def test_the_built_in_smollm2_through_gptq_and_back(builtin_model_available, tmp_path):
    # The real architecture: tied embeddings (lm_head stored once), 576-wide layers (group 64), a tokenizer.
    from quantkern.builtin_model import load_builtin_model

    model, tokenizer = load_builtin_model(dtype=torch.float32)
    replace_linear(model, bits=4, group_size=64, symmetric=False)
    src = write_source(model, tmp_path / "src", "gptq")
    tokenizer.save_pretrained(str(src))
    dst = convert_checkpoint(src, tmp_path / "dst")
    converted, converted_tokenizer = load_quantized(dst)
    for param in model.parameters():
        param.data = param.data.half().float()
    ids = converted_tokenizer("The capital of France is", return_tensors="pt").input_ids
    assert torch.equal(logits(converted, ids), logits(model, ids))


@pytest.mark.parametrize("packing, fmt, layout, symmetric, group_size", [
    ("auto_round:auto_gptq", "gptq", "gptq", True, 128),  # AutoRound's default: symmetric, GPTQ v1 packing
    ("auto_round", "gptq", "gptq_v2", False, 32),         # its own packing (asymmetric): GPTQ v2's layout
    ("auto_round:gptqmodel", "gptq", "gptq_v2", False, 64),
    ("auto_round:auto_awq", "awq", "gemm", False, 64),
])
def test_autoround_checkpoints_convert_through_the_layout_they_name(tmp_path, packing, fmt, layout, symmetric,
                                                                    group_size):
    model = quantized_llama(symmetric, group_size)
    autoround = {"quant_method": "auto-round", "packing_format": packing, "sym": symmetric, "data_type": "int",
                 "act_bits": 16, "checkpoint_format": None, "desc_act": None, "version": None, "zero_point": None}
    src = write_source(model, tmp_path / "src", fmt, layout=layout, extra_config=autoround)
    converted, _ = load_quantized(convert_checkpoint(src, tmp_path / "dst"))
    for param in model.parameters():
        param.data = param.data.half().float()
    assert torch.equal(logits(converted, IDS), logits(model, IDS))
    metadata = read_metadata(tmp_path / "dst")
    assert metadata["tag"] == f"AutoRound_w4_g{group_size}_headfp16"
    assert metadata["method_config"]["imported_from"]["layout"] == packing


def test_autoround_gptq_packing_reads_a_clamped_zero_as_its_loader_does():
    # AutoRound's GPTQ v1 packer stores max(zero - 1, 0) nibble by nibble (a zero of 0 cannot be stored); the v1
    # loader adds 1 to each nibble, so that zero reads back as 1. The converter reads what that loader computes.
    from quantkern.convert import convert_layer, source_quantization_config

    n, k = 8, 32
    zeros = torch.tensor([0, 1, 2, 7, 8, 9, 14, 15], dtype=torch.int64)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    stored_zeros = (zeros - 1).clamp(min=0).to(torch.uint8)
    tensors = {"layer.qweight": pack_along_last(codes).t().contiguous(),
               "layer.qzeros": pack_along_last(stored_zeros.unsqueeze(0)),
               "layer.scales": torch.ones(1, n, dtype=torch.float16)}
    fmt = source_quantization_config({"quantization_config": {"quant_method": "auto-round", "bits": 4,
                                                              "group_size": -1, "sym": False}}, "src")
    qw, permutation = convert_layer(tensors, "layer", fmt, k, n)
    assert permutation is None and torch.equal(qw.codes(), codes)
    assert qw.zero_codes()[:, 0].tolist() == [1, 1, 2, 7, 8, 9, 14, 15]


@pytest.mark.parametrize("change, message", [
    ({"packing_format": "auto_round:fp8_static"}, "packing_format 'auto_round:fp8_static'"),
    ({"data_type": "nv_fp"}, "data_type 'nv_fp'"),
    ({"data_type": "int_asym_float_zp"}, "data_type 'int_asym_float_zp'"),  # float zero points
    ({"act_bits": 8}, "act_bits 8"),
    ({"extra_config": {"model.layers.0.mlp.down_proj": {"bits": 8}}}, "down_proj is quantized with {'bits': 8}"),
])
def test_autoround_settings_quantkern_cannot_run_are_refused(tmp_path, change, message):
    autoround = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", **change}
    src = write_source(quantized_llama(True, 32), tmp_path / "src", "gptq", extra_config=autoround)
    with pytest.raises(UnsupportedCheckpointError, match=message):
        convert_checkpoint(src, tmp_path / "dst")


def test_autoround_layers_left_in_floating_point_stay_so(tmp_path):
    torch.manual_seed(0)
    model = replace_linear(LlamaForCausalLM(TINY_LLAMA).eval(), bits=4, group_size=32, skip=("lm_head", "down_proj"))
    left = {f"model.layers.{i}.mlp.down_proj": {"bits": 16, "data_type": "float"} for i in range(2)}
    autoround = {"quant_method": "auto-round", "packing_format": "auto_round:auto_gptq", "extra_config": left}
    converted, _ = load_quantized(convert_checkpoint(write_source(model, tmp_path / "src", "gptq",
                                                                  extra_config=autoround), tmp_path / "dst"))
    assert type(converted.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert read_quantization_config(tmp_path / "dst")["quantization_config"]["modules_not_converted"] == [
        "down_proj", "lm_head"]
    for param in model.parameters():
        param.data = param.data.half().float()
    assert torch.equal(logits(converted, IDS), logits(model, IDS))


def test_qwen2_gptq_with_projection_biases(tmp_path):
    # Qwen2/2.5 (the most common GPTQ checkpoints on the hub): q/k/v_proj carry biases, stored beside the packed
    # weights as <layer>.bias in fp16.
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.bias.normal_()  # (zero at init: make them count)
    replace_linear(model, bits=4, group_size=64, symmetric=False)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    biases = {f"{name}.bias": module.bias.half() for name, module in model.named_modules()
              if isinstance(module, QuantLinear) and module.bias is not None}
    src = write_source(model, tmp_path / "src", "gptq", layout="gptq_v2")
    from safetensors.torch import load_file

    save_file({**load_file(str(src / "model.safetensors")), **biases}, str(src / "model.safetensors"))
    converted, _ = load_quantized(convert_checkpoint(src, tmp_path / "dst"))
    assert torch.equal(converted.model.layers[1].self_attn.k_proj.bias, biases["model.layers.1.self_attn.k_proj.bias"])
    for param in model.parameters():
        param.data = param.data.half().float()
    assert torch.equal(logits(converted, IDS), logits(model, IDS))
