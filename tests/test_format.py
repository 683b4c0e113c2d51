"""The packed format: packing order, round trips, and validation of QuantizedWeight."""

import pytest
import torch

from quantkern import format as fmt


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
