"""quantkern.hf_integration: AutoModelForCausalLM.from_pretrained(dir) of quantkern checkpoints (CPU)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from quantkern import io  # importing quantkern registers the quantizer with transformers
from quantkern.hf_integration import QuantkernConfig, QuantkernHfQuantizer
from quantkern.kv_cache import (CONFIG_ATTR, cache_argument_name, enable_kv_quantization,
                                kv_quantization_settings, output_cache)
from quantkern.nn import QuantLinear, fuse_projections, replace_linear, set_submodule

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(tie=True, bias=False, seed=0):
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                                      attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def logits(model):
    with torch.no_grad():
        return model(INPUT_IDS).logits


def save(model, directory, **qconfig):
    settings = {"method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, **qconfig}
    return io.save_quantized(model, directory, io.quantization_config(**settings), {"tag": "test"})


def quant_layers(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def assert_same_layers(loaded, original):
    expected, got = quant_layers(original), quant_layers(loaded)
    assert sorted(got) == sorted(expected) and len(got) == 2 * len(ROLES)
    for name, layer in got.items():
        for attribute in ("in_features", "out_features", "bits", "group_size", "act_bits", "act_clip_ratio",
                          "input_rotation"):
            assert getattr(layer, attribute) == getattr(expected[name], attribute), (name, attribute)
        for key, tensor in expected[name].state_dict().items():
            assert getattr(layer, key).dtype == tensor.dtype and torch.equal(getattr(layer, key), tensor), (name, key)
        assert (layer.zeros is None) == (expected[name].zeros is None)
        assert (layer.bias is None) == (expected[name].bias is None)


def load_both(directory, **kwargs):
    """The checkpoint through from_pretrained and through load_quantized, same dtype."""
    hf_model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)
    ours, _ = io.load_quantized(directory, dtype=torch.float32)
    return hf_model, ours


def test_weight_only_checkpoint_loads_as_quantlinear_with_tied_head(tmp_path):
    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    expected = logits(model)
    save(model, tmp_path / "ckpt")
    hf_model, ours = load_both(tmp_path / "ckpt")
    assert_same_layers(hf_model, model)
    assert type(hf_model.lm_head) is torch.nn.Linear
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    assert torch.equal(hf_model.lm_head.weight, model.lm_head.weight)
    assert isinstance(hf_model.config.quantization_config, QuantkernConfig)
    assert isinstance(hf_model.hf_quantizer, QuantkernHfQuantizer)
    assert not any(p.is_meta for p in hf_model.parameters()) and not any(b.is_meta for b in hf_model.buffers())
    assert torch.equal(logits(hf_model), expected)
    assert torch.equal(logits(ours), expected)
    # The default dtype is transformers' ("auto": config.json's dtype, here the fp32 of the model saved).
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").model.embed_tokens.weight.dtype == torch.float32


def test_asymmetric_bf16_scales_with_bias_and_untied_head(tmp_path):
    model = replace_linear(tiny_llama(tie=False, bias=True), bits=4, group_size=64, symmetric=False,
                           scale_dtype=torch.bfloat16, kernel_shapes="reference")
    expected = logits(model)
    save(model, tmp_path / "ckpt", group_size=64, symmetric=False)
    hf_model, ours = load_both(tmp_path / "ckpt")
    assert_same_layers(hf_model, model)  # scales stay bf16: the layer adopts the checkpoint's dtype
    layer = hf_model.model.layers[0].self_attn.q_proj
    assert layer.zeros.dtype == torch.uint8 and layer.scales.dtype == torch.bfloat16 and layer.bias is not None
    assert hf_model.lm_head.weight is not hf_model.model.embed_tokens.weight
    assert torch.equal(logits(hf_model), expected) and torch.equal(logits(ours), expected)


def quantize_with_activations(model, bits, act_bits):
    """Every layer W{bits}A{act_bits} with clip ratio 0.9; down_proj and o_proj rotate their input
    (Hadamard orders 128 and 64) and keep clip ratio 1.0: per-layer overrides in the config."""
    for name, module in list(model.named_modules()):
        role = name.rsplit(".", 1)[-1]
        if role in ROLES:
            rotate = role in ("down_proj", "o_proj")
            set_submodule(model, name, QuantLinear.from_linear(
                module, bits, 32, True, act_bits, act_clip_ratio=1.0 if rotate else 0.9, rotate=rotate))
    return model


@pytest.mark.parametrize("bits, act_bits", [(4, 4), (8, 8), (4, 8)])
def test_activation_quantized_layers_with_hadamard_rotation(tmp_path, bits, act_bits):
    model = quantize_with_activations(tiny_llama(), bits, act_bits)
    expected = logits(model)
    save(model, tmp_path / "ckpt", bits=bits, act_bits=act_bits, act_clip_ratio=0.9, rotation="hadamard")
    qconfig = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    assert sorted(qconfig["layers"]) == sorted(f"model.layers.{i}.{p}" for i in range(2)
                                               for p in ("self_attn.o_proj", "mlp.down_proj"))
    hf_model, ours = load_both(tmp_path / "ckpt")
    assert_same_layers(hf_model, model)
    down, up = hf_model.model.layers[1].mlp.down_proj, hf_model.model.layers[1].mlp.up_proj
    assert (down.input_rotation, down.act_clip_ratio, down.act_bits) == ("hadamard", 1.0, act_bits)
    assert (up.input_rotation, up.act_clip_ratio, up.act_bits) == (None, 0.9, act_bits)
    assert torch.equal(logits(hf_model), expected) and torch.equal(logits(ours), expected)


@pytest.mark.parametrize("act_bits", [None, 4])
@pytest.mark.parametrize("fuse", [False, True])
def test_whole_model_compiles_to_one_graph_over_a_static_cache(act_bits, fuse):
    """torch.compile(fullgraph=True) over a quantized HF model's decode step with a static KV cache: one graph,
    no break, eager's logits (W4A16; W4A4 with an online Hadamard; either with q/k/v and gate/up fused). On the
    CPU the layers run the reference path; tests/test_models_gpu.py checks the same on our kernels, in a CUDA
    graph."""
    from transformers import StaticCache

    model = tiny_llama()
    if act_bits:
        model = quantize_with_activations(model, 4, act_bits)
    else:
        replace_linear(model, bits=4, group_size=32, kernel_shapes="reference")
    if fuse:
        assert len(fuse_projections(model)["fused"]) == 4
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=recording_backend, fullgraph=True, dynamic=False)
    outputs = []
    keyword = cache_argument_name(model.forward)  # ("cache" from transformers 5.24: past_key_values warns)
    for forward in (model, compiled):
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(input_ids=INPUT_IDS, **{keyword: cache}, cache_position=torch.arange(12), use_cache=True)
            outputs.append(forward(input_ids=INPUT_IDS[:, :1], **{keyword: cache},
                                   cache_position=torch.tensor([12]), use_cache=True).logits)
    assert len(graphs) == 1
    # (Within fp32 rounding: under compilation transformers builds the attention mask another way.)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rotate_keys", [False, True])
def test_kv_quantized_checkpoint_enables_kv_quantization(tmp_path, rotate_keys):
    model = enable_kv_quantization(replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference"),
                                   4, rotate_keys=rotate_keys)
    expected = logits(model)
    save(model, tmp_path / "ckpt", kv_bits=4, kv_rotate_keys=rotate_keys)
    hf_model, ours = load_both(tmp_path / "ckpt")
    settings = {"bits": 4, "rotate_keys": rotate_keys}
    assert kv_quantization_settings(hf_model) == settings == getattr(hf_model.config, CONFIG_ATTR)
    assert torch.equal(logits(hf_model), expected) and torch.equal(logits(ours), expected)
    # generate uses the quantized cache too (its default DynamicCache is swapped for it).
    out = hf_model.generate(INPUT_IDS[:1], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert type(output_cache(out)).__name__ == "QuantKVCache"


def test_no_kv_quantization_without_kv_bits(tmp_path):
    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    save(model, tmp_path / "ckpt")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert kv_quantization_settings(hf_model) is None and not hasattr(hf_model.config, CONFIG_ATTR)


def test_dtype_and_device_map(tmp_path):
    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    save(model, tmp_path / "ckpt")
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16, device_map="cpu")
    ours, _ = io.load_quantized(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert hf_model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert hf_model.model.layers[0].mlp.up_proj.scales.dtype == torch.float16  # the stored format, uncast
    assert torch.equal(logits(hf_model), logits(ours))


def test_save_pretrained_writes_a_checkpoint_that_loads_back(tmp_path):
    model = quantize_with_activations(tiny_llama(), 4, 4)
    model = enable_kv_quantization(model, 8)
    expected = logits(model)
    save(model, tmp_path / "ckpt", act_bits=4, act_clip_ratio=0.9, kv_bits=8)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    hf_model.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    tied = {"lm_head.weight", "model.embed_tokens.weight"}  # each writer keeps one of the two names
    assert (set(load_file(tmp_path / "again" / io.WEIGHTS_FILE)) - tied
            == set(load_file(tmp_path / "ckpt" / io.WEIGHTS_FILE)) - tied)
    again, ours = load_both(tmp_path / "again")
    assert_same_layers(again, model)
    assert kv_quantization_settings(again) == kv_quantization_settings(ours) == {"bits": 8, "rotate_keys": False}
    assert torch.equal(logits(again), expected) and torch.equal(logits(ours), expected)
    # save_pretrained writes no quantization_metadata.json (transformers has no hook for other files).
    assert not (tmp_path / "again" / io.METADATA_FILE).exists()


def rewrite_qconfig(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(changes)
    path.write_text(json.dumps(config))


def test_corrupt_checkpoints_are_clear_errors(tmp_path):
    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    save(model, tmp_path / "ckpt")
    rewrite_qconfig(tmp_path / "ckpt", format_version=99)
    with pytest.raises(ValueError, match=r"has format 99/canonical-v1; this quantkern .* reads 1/canonical-v1"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="has format 99"):
        io.load_quantized(tmp_path / "ckpt")

    rewrite_qconfig(tmp_path / "ckpt", format_version=1, group_size=64)  # tensors hold groups of 32
    with pytest.raises(ValueError, match=r"scales has shape \(64, 2\), but quantization_config .* implies \(64, 1\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"scales has shape"):
        io.load_quantized(tmp_path / "ckpt")

    rewrite_qconfig(tmp_path / "ckpt", group_size=32, modules_not_converted=[])  # lm_head is not quantized
    with pytest.raises(ValueError, match="has no quantized weight for lm_head"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")

    rewrite_qconfig(tmp_path / "ckpt", modules_not_converted=["lm_head"])
    weights = tmp_path / "ckpt" / io.WEIGHTS_FILE
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.qweight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"has no model\.layers\.1\.mlp\.up_proj\.qweight"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")

    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())["quantization_config"]
    del config["bits"]
    with pytest.raises(ValueError, match=r"lacks \['bits'\]"):
        QuantkernConfig(**config)

    # Incomplete or malformed files: an error naming the file and what is wrong, not a KeyError or
    # AttributeError from deep inside.
    config_path, metadata_path = tmp_path / "ckpt" / "config.json", tmp_path / "ckpt" / io.METADATA_FILE
    whole = json.loads(config_path.read_text())
    broken = dict(whole, quantization_config={k: v for k, v in whole["quantization_config"].items() if k != "bits"})
    config_path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"quantization_config lacks \['bits'\]"):
        io.load_quantized(tmp_path / "ckpt")
    config_path.write_text(json.dumps({k: v for k, v in whole.items() if k != "model_type"}))
    with pytest.raises(ValueError, match="has no model_type"):
        io.load_quantized(tmp_path / "ckpt")
    config_path.write_text("[]")
    with pytest.raises(ValueError, match="a JSON object expected, got list"):
        io.load_quantized(tmp_path / "ckpt")
    metadata_path.write_text("{}")
    with pytest.raises(ValueError, match="no 'tag'"):
        io.read_metadata(tmp_path / "ckpt")



def test_a_corrupt_weights_file_is_an_error_naming_it(tmp_path):
    # With a dtype given, transformers leaves the file to the quantizer, whose header reading let safetensors'
    # bare "Error while deserializing header" through, naming no file (load_quantized names it).
    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    save(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / io.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])
    match = r"ckpt/model\.safetensors is corrupt: .*header"
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float16)
    with pytest.raises(ValueError, match=match):
        io.load_quantized(tmp_path / "ckpt")


def test_quantized_tensors_of_another_dtype_are_refused_naming_them(tmp_path):
    # fp8 codes were read from the header as uint8 (any unknown dtype was), so they passed the dtype check.
    from safetensors.torch import load_file, save_file

    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    save(model, tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / io.WEIGHTS_FILE
    tensors = load_file(str(weights))
    name = "model.layers.0.mlp.up_proj.qweight"
    tensors[name] = tensors[name].view(torch.float8_e4m3fn)
    save_file(tensors, str(weights), metadata={"format": "pt", "quant_method": "quantkern"})
    with pytest.raises(ValueError, match=r"up_proj\.qweight is torch\.float8_e4m3fn; the format stores it as "
                                         r"torch\.uint8"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float16)


def test_layer_settings_for_layers_that_are_not_quantized_are_refused(tmp_path):
    # A per-layer override naming no converted layer was dropped without a word: the config is another model's.
    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    save(model, tmp_path / "ckpt")
    defaults = {"act_bits": None, "act_clip_ratio": 1.0, "input_rotation": None}
    rewrite_qconfig(tmp_path / "ckpt", layers={"model.layers.0.self_attn.q_proj": defaults,
                                               "model.layers.9.mlp.up_proj": defaults, "lm_head": defaults})
    match = (r"model\.safetensors: quantization_config\['layers'\] has settings for "
             r"\['lm_head', 'model\.layers\.9\.mlp\.up_proj'\], which are not quantized layers of this model")
    with pytest.raises(ValueError, match=match):
        io.load_quantized(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")


def test_quantizing_inside_from_pretrained_is_refused(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "fp")
    qconfig = QuantkernConfig(**io.quantization_config("rtn", 4, 32, True))
    with pytest.raises(ValueError, match="pre-quantized"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "fp", quantization_config=qconfig)


def run_python(code, tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_registration_is_lazy_and_survives_reloads(tmp_path):
    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    save(model, tmp_path / "ckpt")
    out = run_python(f"""
        import importlib, sys, warnings
        warnings.simplefilter("error")  # registering twice must not even warn
        import quantkern
        assert "transformers" not in sys.modules  # import quantkern does not import transformers
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r})
        print(type(model.model.layers[0].mlp.up_proj).__name__)
        importlib.reload(quantkern)
        import quantkern.hf_integration as hf
        importlib.reload(hf)
        from transformers.quantizers import auto
        assert auto.AUTO_QUANTIZER_MAPPING["quantkern"] is hf.QuantkernHfQuantizer
        assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["quantkern"] is hf.QuantkernConfig
        hf.register()
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r})
        print(type(model.hf_quantizer) is hf.QuantkernHfQuantizer)
        assert not [f for f in sys.meta_path if getattr(f, "quantkern_registration_hook", False)]
    """, tmp_path)
    assert out.split() == ["QuantLinear", "True"]


def test_registration_when_transformers_is_imported_first(tmp_path):
    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    save(model, tmp_path / "ckpt")
    out = run_python(f"""
        from transformers import AutoModelForCausalLM
        import transformers.modeling_utils  # the quantizer registry is loaded before quantkern
        import quantkern
        print(type(AutoModelForCausalLM.from_pretrained({str(tmp_path / "ckpt")!r}).lm_head).__name__)
    """, tmp_path)
    assert out.split() == ["Linear"]


def test_import_quantkern_works_without_transformers(tmp_path):
    out = run_python("""
        import sys
        sys.modules["transformers"] = None  # any import of transformers now fails
        import quantkern, quantkern.nn, quantkern.io
        print(quantkern.__version__, [f for f in sys.meta_path if getattr(f, "quantkern_registration_hook", 0)])
    """, tmp_path)
    assert out.split()[1:] == ["[]"]


def test_builtin_model_checkpoint_from_the_cli(builtin_model_available, tmp_path):
    from quantkern.cli import main

    dst = tmp_path / "smollm2-rtn"
    assert main(["quantize", "--dst", str(dst), "--no-eval"]) == 0
    hf_model, ours = load_both(dst)
    assert len(quant_layers(hf_model)) == 30 * len(ROLES)
    assert hf_model.lm_head.weight is hf_model.model.embed_tokens.weight
    input_ids = torch.arange(100, 132).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(hf_model(input_ids).logits, ours(input_ids).logits)


def test_overwrite_replaces_only_a_checkpoint_and_restores_it_on_failure(tmp_path, monkeypatch):
    """--overwrite / overwrite=True deletes what it replaces, so only a quantkern checkpoint is replaced (never a
    model directory, a home directory or '.'), and a failed replacement leaves the old checkpoint in place."""
    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    qconfig = io.quantization_config("rtn", 4, 32, True)

    def write(directory, overwrite=False):
        return io.save_quantized(model, directory, qconfig, {"tag": "test"}, overwrite=overwrite)

    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    (tmp_path / "afile").write_text("x")
    for existing in (other, tmp_path / "afile"):
        with pytest.raises(FileExistsError, match="not a quantkern checkpoint"):
            write(existing, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine" and (tmp_path / "afile").read_text() == "x"

    ckpt = tmp_path / "ckpt"
    write(ckpt)
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        write(ckpt)
    before = (ckpt / "model.safetensors").read_bytes()
    real_replace = os.replace

    def failing_replace(src, dst):  # the staging directory's rename into place fails
        if ".tmp-" in str(src):
            raise OSError("simulated failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        write(ckpt, overwrite=True)
    monkeypatch.undo()
    assert (ckpt / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ckpt", "notes"]  # no staging or backup left
    write(ckpt, overwrite=True)  # a checkpoint is replaced
    assert torch.equal(logits(io.load_quantized(ckpt)[0]), logits(model))


# ---- quantkern.decoding's host-side logic (its CUDA-graph path runs in tests/test_models_gpu.py) -----------------

def test_static_cache_decoder_uses_this_transformers_cache_keyword_and_decodes_as_generate():
    """GraphDecoder's prefill and decode step, run eagerly on the CPU: HF greedy generate's tokens, with the cache
    passed under the keyword the model's forward takes. It passed ``past_key_values``, which transformers 5.24 on
    deprecates (a FutureWarning every call; removal in 5.40)."""
    import warnings

    from transformers import StaticCache

    from quantkern import decoding
    from quantkern.kv_cache import cache_argument_name

    model = replace_linear(tiny_llama(), bits=4, group_size=32, kernel_shapes="reference")
    prompt, steps = INPUT_IDS[:, :5], 6
    decoder = decoding.GraphDecoder.__new__(decoding.GraphDecoder)  # its state, without the CUDA device check
    decoder.model = decoder.forward = model
    decoder.device = torch.device("cpu")
    decoder.cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 2)
    decoder.ids = torch.zeros(prompt.shape[0], 1, dtype=torch.long)
    decoder.position = torch.zeros(1, dtype=torch.long)
    decoder.cache_keyword = cache_argument_name(model.forward)  # as GraphDecoder.__init__ sets it
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        decoder.prefill(prompt)
        decoder._step(), decoder._step()  # the warm-up steps of capture() move the cache on, as on the GPU
        decoder.prefill(prompt)
        tokens = torch.cat([decoder.ids.clone()] + decoder.decode(steps - 1, use_graph=False), dim=1)
        expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                  do_sample=False, pad_token_id=0, eos_token_id=None)[:, prompt.shape[1]:]
    deprecations = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    assert not deprecations, deprecations
    assert torch.equal(tokens, expected)


def test_greedy_decode_rows_that_end_early_read_eos_after_it(monkeypatch):
    """greedy_decode with batch > 1 and eos: a row that produced eos kept the tokens the model decoded after it
    while the other rows went on; those are not its text (generate pads them). The graph is scripted here."""
    from quantkern import decoding

    eos = 2
    script = torch.tensor([[5, eos, 7, 8, 9], [3, 4, 6, eos, 9]])  # the tokens each step decodes, per row

    class ScriptedDecoder:
        def __init__(self, model, batch, max_len, forward=None):
            self.device, self.step = torch.device("cpu"), 0

        def prefill(self, prompt):
            self.step = 0
            self.ids = script[:, :1].clone()

        def capture(self):
            return 0.0

        def decode(self, steps, use_graph):
            out = []
            for _ in range(steps):
                self.step += 1
                out.append(script[:, self.step:self.step + 1].clone())
            return out

    monkeypatch.setattr(decoding, "GraphDecoder", ScriptedDecoder)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    decoded = decoding.greedy_decode(None, torch.zeros(2, 3, dtype=torch.long), 5, eos_token_id=eos)
    # Both rows have ended at the fourth token: the decode stops there, row 0 reading eos after its own.
    assert decoded.tokens.tolist() == [[5, eos, eos, eos], [3, 4, 6, eos]]
    without_eos = decoding.greedy_decode(None, torch.zeros(2, 3, dtype=torch.long), 5).tokens
    assert torch.equal(without_eos, script)
