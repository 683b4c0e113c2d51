"""QuantLinear and replace_linear on the reference path (CPU)."""

import pytest
import torch
from torch import nn

from quantkern import reference
from quantkern.nn import QuantLinear, replace_linear


def tiny_llama(intermediate_size=384):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=intermediate_size, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("bits,group_size,symmetric,act_bits", [
    (4, 128, True, None), (4, 32, False, None), (8, -1, True, None), (8, -1, True, 8), (4, 64, True, 4)])
def test_quant_linear_matches_the_reference(bits, group_size, symmetric, act_bits):
    linear = nn.Linear(256, 96, bias=True)
    layer = QuantLinear.from_linear(linear, bits, group_size, symmetric, act_bits)
    qw = reference.quantize_weight(linear.weight.detach(), bits, group_size, symmetric)
    x = torch.randn(4, 256)
    bias = linear.bias.detach().half()
    if act_bits is None:
        expected = reference.weight_only_linear(x, qw, bias)
    else:
        expected = reference.quantized_activation_linear(x, qw, act_bits, bias)
    assert torch.equal(layer(x), expected)
    assert f"W{bits}A{act_bits or 16}" in repr(layer)


def test_quant_linear_is_a_quarter_of_fp16_at_group_128():
    layer = QuantLinear.from_linear(nn.Linear(4096, 1024, bias=False), 4, 128)
    fp16_bytes = 4096 * 1024 * 2
    assert layer.weight.nbytes() / fp16_bytes <= 0.27


def test_state_dict_round_trip():
    layer = QuantLinear.from_linear(nn.Linear(128, 64), 4, 64, symmetric=False)
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "zeros", "bias"}
    fresh = QuantLinear(128, 64, 4, 64, symmetric=False, bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(3, 128)
    assert torch.equal(fresh(x), layer(x))


def test_input_permutation_reads_the_input_in_its_order_and_round_trips():
    torch.manual_seed(0)
    qw = reference.quantize_weight(torch.randn(64, 128), 4, 32, symmetric=False)
    permutation = torch.randperm(128)
    layer = QuantLinear.from_quantized(qw, torch.randn(64), input_permutation=permutation)
    x = torch.randn(3, 5, 128)
    assert torch.equal(layer(x), reference.weight_only_linear(x[..., permutation], qw, layer.bias))
    assert "input_permutation" in repr(layer)
    state = layer.state_dict()
    assert torch.equal(state["input_permutation"], permutation)
    fresh = QuantLinear(128, 64, 4, 32, symmetric=False, bias=True, input_permutation=True)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), layer(x))
    duplicated = permutation.clone()
    duplicated[0] = duplicated[1]
    with pytest.raises(ValueError, match="not a permutation"):
        QuantLinear.from_quantized(qw, input_permutation=duplicated)
    with pytest.raises(ValueError, match="input_permutation is not a permutation"):
        fresh.load_state_dict({**state, "input_permutation": duplicated})
    with pytest.raises(ValueError, match="int64 of shape"):
        QuantLinear.from_quantized(qw, input_permutation=permutation.to(torch.int32))
    with pytest.raises(ValueError, match="permutes or rotates"):
        QuantLinear(128, 64, input_rotation="hadamard", input_permutation=True)


def test_quant_linear_rejects_unsupported_modes():
    with pytest.raises(ValueError, match="W8A4"):
        QuantLinear(64, 64, bits=8, act_bits=4)
    with pytest.raises(ValueError, match="symmetric"):
        QuantLinear(64, 64, bits=4, act_bits=4, symmetric=False)
    with pytest.raises(TypeError, match="nn.Linear"):
        QuantLinear.from_linear(nn.Conv1d(4, 4, 1))
    for in_features, out_features in ((0, 16), (64, 0)):  # K = 0 divided by zero; N = 0 built an empty layer
        with pytest.raises(ValueError, match=f"in_features and out_features >= 1, got {in_features} -> {out_features}"):
            QuantLinear(in_features, out_features, group_size=-1)
    with pytest.raises(ValueError, match="got 0 -> 8"):
        QuantLinear.from_linear(nn.Linear(0, 8))


def test_replace_linear_keeps_lm_head_and_generates():
    model = tiny_llama()
    replace_linear(model, bits=4, group_size=64)
    kinds = {name: type(m).__name__ for name, m in model.named_modules() if name.endswith(("proj", "lm_head"))}
    assert kinds["lm_head"] == "Linear"
    assert all(kind == "QuantLinear" for name, kind in kinds.items() if name != "lm_head")
    assert len(kinds) == 2 * 7 + 1
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_replace_linear_checks_every_layer_before_replacing():
    model = tiny_llama(intermediate_size=320)  # down_proj has in_features 320, which 128 does not divide
    with pytest.raises(ValueError, match="down_proj: group_size 128 does not divide in_features 320"):
        replace_linear(model, bits=4, group_size=128)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())  # nothing half-replaced
    replace_linear(model, bits=4, group_size="auto")  # auto picks 64, which divides 128 and 320
    assert {m.group_size for m in model.modules() if isinstance(m, QuantLinear)} == {64}


def test_replace_linear_leaves_the_model_as_it_was_on_any_error():
    """An error only building a later layer (an odd in_features for int4 packing) replaces nothing."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 7), nn.Linear(7, 8))
    with pytest.raises(ValueError, match="even"):
        replace_linear(model, bits=4, group_size=-1, kernel_shapes="reference")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_replace_linear_takes_a_single_skip_name_as_a_string():
    model = tiny_llama()
    replace_linear(model, bits=4, group_size=64, skip="lm_head")  # not the letters l, m, _, h, e, a, d
    assert type(model.lm_head) is nn.Linear
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 2 * 7


def test_half_and_float_keep_the_stored_scale_dtype():
    layer = QuantLinear.from_linear(nn.Linear(128, 64), 4, 64)
    layer.float()
    assert layer.scales.dtype == torch.float16
    x = torch.randn(2, 128)
    assert torch.equal(layer(x), reference.weight_only_linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.bfloat16])
def test_dtype_changes_leave_the_stored_scales_and_bias_bit_for_bit(scale_dtype):
    """The scales and the bias are the checkpoint's, in its dtype: .bfloat16() then .half() cast them through
    bf16 (3 mantissa bits lost), .half() made a bf16 bias beyond fp16's range inf, .float() saved an fp32 bias."""
    linear = nn.Linear(128, 64)
    with torch.no_grad():
        linear.bias[0] = 1e5 if scale_dtype == torch.bfloat16 else 1.2345
    layer = QuantLinear.from_linear(linear, 4, 64, scale_dtype=scale_dtype)
    before = {name: tensor.clone() for name, tensor in layer.state_dict().items()}
    x = torch.randn(2, 128)
    expected = layer(x)
    for change in (layer.bfloat16, layer.half, layer.float, lambda: layer.to(torch.float16), lambda: layer.to("cpu")):
        change()
        after = layer.state_dict()
        assert {name: t.dtype for name, t in after.items()} == {name: t.dtype for name, t in before.items()}
        assert all(torch.equal(after[name], before[name]) for name in before)
    assert torch.equal(layer(x), expected)


def test_the_bias_is_cast_once_for_the_kernel_and_stays_in_its_stored_dtype():
    # A bf16-stored bias run with fp16 activations: cast when the weight is prepared, not in every call.
    layer = QuantLinear.from_linear(nn.Linear(64, 16), 4, 32, scale_dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.float16)
    y = layer(x)
    assert layer.bias.dtype == torch.bfloat16 and layer._kernel_bias.dtype == torch.float16
    assert torch.equal(y, reference.weight_only_linear(x, layer.weight, layer.bias.half()))
    layer.load_state_dict(layer.state_dict())  # a reload forgets the prepared weight and its bias
    assert layer._prepared is None and layer._kernel_bias is None


@pytest.mark.parametrize("act_bits", [None, 8])
def test_forward_names_x_when_it_is_not_a_floating_tensor(act_bits):
    layer = QuantLinear.from_linear(nn.Linear(64, 8), 4, 32, act_bits=act_bits)
    for bad in (torch.ones(2, 64, dtype=torch.int32), torch.ones(2, 64, dtype=torch.float64)):
        with pytest.raises(TypeError, match=f"QuantLinear: x must be float16 or bfloat16.*got {bad.dtype}"):
            layer(bad)
    with pytest.raises(TypeError, match="QuantLinear: x must be a torch.Tensor, got list"):
        layer([[0.0] * 64])
    assert layer._prepared is None  # refused before anything was prepared for the bad dtype


@pytest.mark.gpu
def test_gpu_layer_holds_the_weight_once_and_still_saves_the_canonical_format():
    from quantkern import backends

    if not any("weight_only_linear" in backends.status(b).kernels for b in ("cuda", "triton")):
        pytest.skip("no GPU W4A16 kernel")
    linear = nn.Linear(4096, 4096, bias=False)
    layer = QuantLinear.from_linear(linear, 4, 128).cuda()
    state_before = {k: v.clone() for k, v in layer.state_dict().items()}
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    x = torch.randn(3, 4096, device="cuda", dtype=torch.float16)
    y = layer(x)  # prepares: kernel layout on the GPU, canonical copy parked in host memory
    weight_bytes = torch.cuda.memory_allocated() - before + layer.qweight.numel() + layer.scales.numel() * 2
    assert layer.qweight.device.type == "cpu"
    assert weight_bytes <= 0.27 * 4096 * 4096 * 2 + 4 * 4096 * 3  # (+ the output and input)
    state_after = layer.state_dict()
    assert all(torch.equal(state_before[k].cpu(), state_after[k].cpu()) for k in state_before)
    expected = reference.weight_only_linear(x, layer.weight.to("cuda"))
    assert ((y.float() - expected.float()).norm() / expected.float().norm()) < 2e-3


def test_replace_linear_refuses_shapes_the_gpu_kernel_cannot_serve():
    model = nn.Sequential(nn.Linear(96, 64), nn.Linear(64, 40))  # 96 is not a multiple of the 64-wide k-tile
    with pytest.raises(ValueError, match="0: the CUDA W4A16 kernel needs in_features to be a multiple of 64"):
        replace_linear(model, bits=4, group_size=32)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    replace_linear(model, bits=4, group_size=32, kernel_shapes="reference")  # on purpose: CPU reference only
    assert all(isinstance(m, QuantLinear) for m in model)


def test_rtn_refuses_weights_and_biases_it_cannot_store():
    """A NaN weight, or a value beyond fp16 in an fp16 scale or bias, is an error, not inf / NaN outputs."""
    linear = nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="row 3, group 0 has no finite scale: it holds a NaN"):
        QuantLinear.from_linear(linear, 4, 32)
    with torch.no_grad():
        linear.weight[3, 5] = 1e6
    with pytest.raises(ValueError, match="overflows torch.float16"):
        QuantLinear.from_linear(linear, 4, 32)
    with torch.no_grad():
        linear.weight[3, 5] = 0.1
        linear.bias[0] = 1e6
    with pytest.raises(ValueError, match="bias overflows"):
        QuantLinear.from_linear(linear, 4, 32)
    layer = QuantLinear.from_linear(linear, 4, 32, scale_dtype=torch.bfloat16)  # bf16 holds them
    assert torch.isfinite(layer(torch.randn(2, 64))).all()


def test_unknown_backend_names_are_refused_where_they_are_given():
    """A bad name is an error at once: prepare() kept it on the layer (every later forward failed), and
    replace_linear's kernel_shapes took any unknown name for triton."""
    layer = QuantLinear.from_linear(nn.Linear(64, 8), 4, 32)
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        layer.prepare(backend="bogus")
    assert layer.backend is None and layer(torch.randn(2, 64)).shape == (2, 8)
    with pytest.raises(ValueError, match="unknown backend 'bogus'"):
        replace_linear(nn.Sequential(nn.Linear(64, 8)), bits=4, group_size=32, kernel_shapes="bogus")


def test_cuda_graph_decoding_refuses_a_model_off_the_gpu_or_with_a_quantized_kv_cache():
    from transformers import LlamaConfig, LlamaForCausalLM

    from quantkern.decoding import greedy_decode

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1)).eval()
    with pytest.raises(ValueError, match="needs the model on a CUDA device"):
        greedy_decode(model, torch.zeros(1, 3, dtype=torch.long), 4)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        greedy_decode(model, torch.zeros(1, 3, dtype=torch.long), 0)
    with pytest.raises(ValueError, match="at least one token"):
        greedy_decode(model, torch.zeros(1, 0, dtype=torch.long), 4)

    from quantkern.kv_cache import enable_kv_quantization

    enable_kv_quantization(model, bits=4)  # QuantKVCache grows by concatenation: no static cache to capture
    with pytest.raises(ValueError, match="quantizes its KV cache"):
        greedy_decode(model, torch.zeros(1, 3, dtype=torch.long), 4)


def test_group_size_must_be_an_int_everywhere_it_is_given():
    """64.5 ran as group 64 (int() truncated it), 64.0 failed in reshape with a TypeError about its shape."""
    makers = (lambda g: QuantLinear(128, 8, group_size=g), lambda g: QuantLinear.from_linear(nn.Linear(128, 8), 4, g),
              lambda g: replace_linear(nn.Sequential(nn.Linear(128, 8)), group_size=g, kernel_shapes="reference")[0])
    for make in makers:
        for bad in (64.5, 64.0, True):
            with pytest.raises(TypeError, match=f"group_size must be an int .* got {type(bad).__name__} {bad}"):
                make(bad)
        assert make(64).group_size == 64
    with pytest.raises(ValueError, match="group_size must be an int .* or 'auto', got 'abc'"):
        makers[2]("abc")
    assert makers[2]("64").group_size == 64  # as a command line passes it
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):  # was an AttributeError
        replace_linear("model.safetensors")


def test_layers_refuse_shapes_and_weights_they_cannot_hold():
    with pytest.raises(ValueError, match="in_features must be even, got 255"):  # was built: qweight [8, 127]
        QuantLinear(255, 8, bits=4, group_size=-1)
    assert QuantLinear(255, 8, bits=8, group_size=-1).qweight.shape == (8, 255)
    with pytest.raises(ValueError, match="weight is on the meta device"):  # was: Tensor.item() ... meta tensors
        QuantLinear.from_linear(nn.Linear(64, 8, device="meta"), 4, 32)


def test_repr_tells_the_format_and_the_backend_that_runs_the_layer():
    layer = QuantLinear.from_linear(nn.Linear(64, 8), 4, 32, symmetric=False)
    assert repr(layer).endswith("W4A16, input_rotation=None, group_size=32, asymmetric, bias=True, backend=auto)")
    layer(torch.randn(1, 64))  # the automatic choice, once made, is shown (it said "auto" only)
    assert repr(layer).endswith("backend=auto (reference on cpu))")
    layer.prepare(backend="reference")
    assert repr(layer).endswith("backend=reference)")
    assert "group_size=per-channel" in repr(QuantLinear.from_linear(nn.Linear(64, 8), 8, -1))


def test_loading_scales_of_another_dtype_is_refused_not_cast():
    """load_state_dict copies with a cast: bf16 scales beyond fp16's range loaded as inf (inf outputs)."""
    linear = nn.Linear(64, 8)
    with torch.no_grad():
        linear.weight[0] *= 1e7
    state = QuantLinear.from_linear(linear, 4, 32, scale_dtype=torch.bfloat16).state_dict()
    layer = QuantLinear(64, 8, 4, 32, bias=True)  # fp16 scales
    with pytest.raises(ValueError, match="scales is torch.bfloat16 but the layer stores torch.float16"):
        layer.load_state_dict(state)
    assert torch.equal(layer.scales, torch.ones_like(layer.scales))  # nothing loaded
    right = QuantLinear(64, 8, 4, 32, bias=True, scale_dtype=torch.bfloat16)
    right.load_state_dict(state)
    assert torch.isfinite(right(torch.randn(2, 64))).all()
    layer.load_state_dict(state, assign=True)  # takes the tensors as they are
    assert layer.scales.dtype == torch.bfloat16 and torch.equal(layer.scales, state["scales"])
