"""The packed format: packing order, round trips, and validation of QuantizedWeight."""

from pathlib import Path

import pytest
import torch

from quantkern import format as fmt
from quantkern import reference


def test_pack_int4_nibble_order_is_low_first():
    codes = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)
    packed = fmt.pack_int4(codes)
    assert packed.tolist() == [[0x21, 0x0F, 0x87]]


@pytest.mark.parametrize("shape", [(1, 2), (3, 576), (2, 5, 896), (7, 4864)])
def test_pack_unpack_round_trip(shape):
    codes = torch.randint(0, 16, shape, dtype=torch.uint8)
    packed = fmt.pack_int4(codes)
    assert packed.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(fmt.unpack_int4(packed), codes)


def test_signed_pack_is_twos_complement():
    values = torch.tensor([[-8, 7, -1, 0, 3, -5]], dtype=torch.int8)
    packed = fmt.pack_int4_signed(values)
    assert packed.tolist() == [[0x78, 0x0F, 0xB3]]
    assert torch.equal(fmt.unpack_int4_signed(packed), values)


def test_signed_round_trip_random():
    values = torch.randint(-8, 8, (33, 128), dtype=torch.int8)
    assert torch.equal(fmt.unpack_int4_signed(fmt.pack_int4_signed(values)), values)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="even"):
        fmt.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        fmt.pack_int4(torch.zeros(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="0..15"):
        fmt.pack_int4(torch.full((1, 2), 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="int8"):
        fmt.pack_int4_signed(torch.zeros(1, 2, dtype=torch.uint8))


def test_group_length_validation():
    assert fmt.group_length(128, 4096) == 128
    assert fmt.group_length(-1, 576) == 576
    assert fmt.group_length(None, 576) == 576
    with pytest.raises(ValueError, match="does not divide in_features 576"):
        fmt.group_length(128, 576)
    with pytest.raises(ValueError, match="group_size must be one of"):
        fmt.group_length(48, 576)
    # 64.0 in (32, 64, 128, -1) holds: a float size reached reshape (a TypeError about its shape argument)
    for bad in (64.0, -1.0, True):
        with pytest.raises(TypeError, match=rf"group_size must be an int \(.*\), got {type(bad).__name__}"):
            fmt.group_length(bad, 576)
    with pytest.raises(TypeError, match=r"group_size must be an int \(.*\), got float 64.0"):
        reference.quantize_weight(torch.randn(4, 576), 4, 64.0)
    with pytest.raises(TypeError, match="bits must be an int, got float 4.0"):
        reference.quantize_weight(torch.randn(4, 576), 4.0, 64)


def _weight(n=8, k=64, bits=4, group=32, symmetric=True):
    groups = k // group
    packed = k // 2 if bits == 4 else k
    return dict(qweight=torch.zeros(n, packed, dtype=torch.uint8),
                scales=torch.ones(n, groups, dtype=torch.float16),
                zeros=None if symmetric else torch.zeros(n, groups, dtype=torch.uint8),
                bits=bits, group_size=group, in_features=k, out_features=n)


def test_quantized_weight_accepts_valid_and_reports_size():
    qw = fmt.QuantizedWeight(**_weight())
    assert qw.symmetric and qw.n_groups == 2 and qw.group_length == 32
    assert qw.nbytes() == 8 * 32 + 8 * 2 * 2
    assert torch.equal(qw.zero_codes(), torch.full((8, 2), 8, dtype=torch.uint8))


@pytest.mark.parametrize("field,value,error,match", [
    ("qweight", torch.zeros(8, 64, dtype=torch.uint8), ValueError, "qweight must have shape"),
    ("qweight", torch.zeros(8, 32, dtype=torch.int32), TypeError, "uint8"),
    ("scales", torch.ones(8, 2, dtype=torch.float32), TypeError, "float16 or bfloat16"),
    ("scales", torch.ones(8, 3, dtype=torch.float16), ValueError, "scales must have shape"),
    ("zeros", torch.zeros(8, 3, dtype=torch.uint8), ValueError, "zeros must have shape"),
    ("bits", 3, ValueError, "bits must be one of"),
    ("group_size", 128, ValueError, "does not divide"),
])
def test_quantized_weight_rejects_inconsistent_tensors(field, value, error, match):
    kwargs = _weight()
    kwargs[field] = value
    with pytest.raises(error, match=match):
        fmt.QuantizedWeight(**kwargs)


def test_tensors_round_trip_by_name():
    from safetensors.torch import load, save

    # Random contents (constants would hide a swapped or mis-named tensor), through safetensors as in a checkpoint.
    generator = torch.Generator().manual_seed(0)
    kwargs = _weight(symmetric=False)
    kwargs["qweight"] = torch.randint(0, 256, (8, 32), dtype=torch.uint8, generator=generator)
    kwargs["scales"] = torch.rand(8, 2, generator=generator).half() + 0.01
    kwargs["zeros"] = torch.randint(0, 16, (8, 2), dtype=torch.uint8, generator=generator)
    qw = fmt.QuantizedWeight(**kwargs)
    tensors = qw.tensors("model.layers.0.mlp.up_proj")
    assert set(tensors) == {f"model.layers.0.mlp.up_proj.{n}" for n in ("qweight", "scales", "zeros")}
    back = fmt.QuantizedWeight.from_tensors(load(save(tensors)), "model.layers.0.mlp.up_proj", 4, 32, 64, 8)
    for name in ("qweight", "scales", "zeros"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    assert (back.bits, back.group_size, back.in_features, back.out_features) == (4, 32, 64, 8)
    with pytest.raises(KeyError, match="missing tensors"):
        fmt.QuantizedWeight.from_tensors({}, "x", 4, 32, 64, 8)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (quantkern.io): what load_quantized refuses, and how save_quantized writes
# ---------------------------------------------------------------------------------------------------------------

LAYER = "model.layers.0.mlp.up_proj"


def _tiny_quantized_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkern.nn import replace_linear

    config = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return replace_linear(LlamaForCausalLM(config).eval(), bits=4, group_size=32, symmetric=False,
                          kernel_shapes="reference")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from quantkern import io

    model = _tiny_quantized_llama()
    qconfig = io.quantization_config("rtn", 4, 32, False)
    return io.save_quantized(model, tmp_path_factory.mktemp("ckpt") / "ckpt", qconfig,
                             io.build_metadata(qconfig, "tiny", None, {}))


def _copy(checkpoint, tmp_path):
    import shutil

    return Path(shutil.copytree(checkpoint, tmp_path / "copy"))


def _rewrite_tensor(directory, name, tensor):
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    tensors[name] = tensor
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("suffix, make, message", [
    ("qweight", lambda t: t.to(torch.int8), r"up_proj\.qweight is torch\.int8; the format stores it as torch\.uint8"),
    ("scales", lambda t: t.float(), r"up_proj\.scales is torch\.float32; the format stores it as torch\.float16 or"),
    ("zeros", lambda t: t.to(torch.int32), r"up_proj\.zeros is torch\.int32"),
    ("zeros", lambda t: torch.full_like(t, 16), r"up_proj\.zeros holds 16, outside the 4-bit code range 0\.\.15"),
    ("input_permutation", lambda t: torch.arange(128, dtype=torch.int32), r"input_permutation is torch\.int32"),
])
def test_load_refuses_a_quantized_tensor_of_another_dtype_or_range(checkpoint, tmp_path, suffix, make, message):
    # Loading assigns the stored tensors as they are: a wrong dtype used to load and fail only at the first forward,
    # an out-of-range zero code to run and compute garbage.
    from safetensors.torch import load_file

    from quantkern.io import load_quantized

    directory = _copy(checkpoint, tmp_path)
    stored = load_file(str(directory / "model.safetensors")).get(f"{LAYER}.{suffix}")
    _rewrite_tensor(directory, f"{LAYER}.{suffix}", make(stored))
    with pytest.raises(ValueError, match=f"{directory / 'model.safetensors'}: .*{message}"):
        load_quantized(directory)


def test_load_names_the_file_for_an_unquantized_tensor_of_another_shape(checkpoint, tmp_path):
    from quantkern.io import load_quantized

    directory = _copy(checkpoint, tmp_path)
    _rewrite_tensor(directory, "model.norm.weight", torch.ones(5))
    with pytest.raises(ValueError, match=r"(?s)model\.safetensors does not fit the model .*mismatch for model\.norm"):
        load_quantized(directory)


@pytest.mark.parametrize("changes, message", [
    ({"bits": "4"}, r"bits '4' \(expected one of \(4, 8\)\)"),
    ({"group_size": "32"}, r"group_size '32'"),
    ({"act_bits": 2}, r"act_bits 2 \(expected null, 4 or 8\)"),
    ({"kv_bits": 3}, r"kv_bits 3"),
    ({"act_clip_ratio": "x"}, r"act_clip_ratio 'x'"),
    ({"modules_not_converted": "lm_head"}, r"modules_not_converted 'lm_head' \(expected a list of names\)"),
    ({"modules_not_converted": None}, r"modules_not_converted None"),
    ({"layers": []}, r"layers \[\]"),
    ({"layers": {LAYER: {"act_bits": None, "clip": 1}}}, r"layers \{"),
    ({"format_version": 2}, r"has format 2/canonical-v1; .* reads 1/canonical-v1 \(.* newer format: upgrade"),
    ({"act_bits": 8}, r"model\.safetensors: model\.layers\.0\.self_attn\.q_proj as quantization_config describes "
                      r"it: .* need symmetric weights"),
])
def test_load_refuses_a_malformed_quantization_config_naming_the_checkpoint(checkpoint, tmp_path, changes, message):
    import json

    from quantkern.io import load_quantized

    directory = _copy(checkpoint, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"].update(changes)
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"{directory}.*{message}"):
        load_quantized(directory)


def test_load_names_the_config_for_an_unknown_model_type(checkpoint, tmp_path):
    import json

    from quantkern.io import load_quantized

    directory = _copy(checkpoint, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "no-such-model"}))
    with pytest.raises(ValueError, match=r"config\.json: model_type 'no-such-model' is not one this transformers"):
        load_quantized(directory)


def test_a_saved_checkpoint_loads_back_the_same(checkpoint):
    from quantkern.io import load_quantized

    model = _tiny_quantized_llama()
    loaded, _ = load_quantized(checkpoint)
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_save_never_replaces_a_directory_that_appeared_while_it_wrote(tmp_path, monkeypatch):
    # The destination is checked before the slow work and again just before the rename: a directory made meanwhile
    # (another run writing the same --dst) used to be moved aside and deleted although overwriting was not asked.
    from quantkern import io

    model = _tiny_quantized_llama()
    qconfig = io.quantization_config("rtn", 4, 32, False)
    dst = tmp_path / "dst"
    real_write = io._write_json

    def write_then_race(path, data):
        real_write(path, data)
        if not dst.exists():
            dst.mkdir()
            (dst / "theirs.txt").write_text("keep")

    monkeypatch.setattr(io, "_write_json", write_then_race)
    with pytest.raises(FileExistsError, match="already exists"):
        io.save_quantized(model, dst, qconfig, {"tag": "t"})
    assert [p.name for p in dst.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no staging directory left behind


def test_save_refuses_a_malformed_quantization_config_before_writing(tmp_path):
    from quantkern import io

    qconfig = {**io.quantization_config("rtn", 4, 32, False), "modules_not_converted": "lm_head"}
    with pytest.raises(ValueError, match="modules_not_converted 'lm_head'"):
        io.save_quantized(_tiny_quantized_llama(), tmp_path / "dst", qconfig, {"tag": "t"})
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_metadata_without_a_tag_before_writing(tmp_path):
    # read_metadata (quantkern info, eval) refuses a checkpoint whose metadata has no tag: so does the writer.
    from quantkern import io

    qconfig = io.quantization_config("rtn", 4, 32, False)
    for metadata in ({}, {"tag": 4}, None):
        with pytest.raises(ValueError, match="needs a 'tag' string"):
            io.save_quantized(_tiny_quantized_llama(), tmp_path / "dst", qconfig, metadata)
    assert list(tmp_path.iterdir()) == []


def test_load_names_the_checkpoint_for_corrupt_tokenizer_files(checkpoint, tmp_path):
    from quantkern.io import load_quantized

    directory = _copy(checkpoint, tmp_path)
    (directory / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"copy: its tokenizer files are corrupt"):  # was json's bare message
        load_quantized(directory)
