"""quantkern.fuse_projections: q/k/v_proj and gate/up_proj as one GEMM each (CPU: reference path and Triton
under the interpreter; tests/test_hf_integration.py compiles a fused model; tests/test_models_gpu.py runs fused
models on the GPU kernels)."""

import pytest
import torch
import transformers

import quantkern
from quantkern import io, ops
from quantkern.nn import QuantLinear, replace_linear, set_submodule

INPUT_IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS_PER_LAYER = ["self_attn.{q_proj,k_proj,v_proj}", "mlp.{gate_proj,up_proj}"]


def tiny_model(kind="llama", bias=False):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, attention_bias=bias)
    torch.manual_seed(0)
    if kind == "qwen3":  # per-head q_norm / k_norm on the q and k outputs
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=16)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, mlp_bias=bias)).eval()


def quantized(mode, kind="llama", bias=False):
    """Every Linear but lm_head quantized by RTN: W4A16 (symmetric or with zero points), W8A8, W4A4 with
    clip ratio 0.9, or W4A4 with every layer rotating its input online (the q/k/v group shares one rotation)."""
    model = tiny_model(kind, bias)
    options = {"w4a16": dict(group_size=32), "w4a16-asym": dict(group_size=32, symmetric=False),
               "w8a8": dict(bits=8, act_bits=8, group_size=-1), "w4a4": dict(act_bits=4, group_size=32),
               "w4a4-rotated": dict(act_bits=4, group_size=-1)}[mode]
    if mode in ("w4a4", "w4a4-rotated"):
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in ROLES:
                set_submodule(model, name, QuantLinear.from_linear(module, 4, options["group_size"], act_bits=4,
                                                                   act_clip_ratio=0.9, rotate=mode == "w4a4-rotated"))
        return model
    return replace_linear(model, **options, kernel_shapes="reference")


def count_gemms(model, monkeypatch):
    """``forward() -> logits``, counting the calls of the ops that run a quantized Linear."""
    calls = []
    for name in ("weight_only_linear", "quantized_activation_linear"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _op=original, **kwargs: calls.append(1) or _op(*args, **kwargs))

    def forward():
        calls.clear()
        with torch.no_grad():
            return model(INPUT_IDS).logits
    return forward, calls


@pytest.mark.parametrize("kind, mode, bias", [("llama", "w4a16", False), ("llama", "w4a16-asym", True),
                                              ("llama", "w8a8", True), ("llama", "w4a4", False),
                                              ("llama", "w4a4-rotated", False), ("qwen3", "w4a16", False),
                                              ("qwen3", "w4a4", True)])
def test_fused_groups_give_the_logits_of_separate_layers(monkeypatch, kind, mode, bias):
    model = quantized(mode, kind, bias)
    forward, calls = count_gemms(model, monkeypatch)
    expected = forward()
    assert len(calls) == 7 * 2
    report = quantkern.fuse_projections(model)
    assert report == {"fused": [f"model.layers.{i}.{group}" for i in range(2) for group in GROUPS_PER_LAYER],
                      "skipped": {}}
    got = forward()
    assert len(calls) == 4 * 2  # one GEMM for q/k/v, one for gate/up, o_proj, down_proj
    # The same sums per output column; only the fp32 matmul's blocking over a wider weight may differ.
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # Nothing is kept between steps: each group dropped its outputs once every member had read its own.
    fusions = {id(m._fusion[0]): m._fusion[0] for m in model.modules() if isinstance(m, QuantLinear) and m._fusion}
    assert len(fusions) == 4 and all(f._pending is None for f in fusions.values())
    assert quantkern.unfuse_projections(model) == 5 * 2
    torch.testing.assert_close(forward(), expected, rtol=0, atol=0)
    assert len(calls) == 7 * 2


def test_fusion_changes_no_weight_and_no_checkpoint(tmp_path):
    model = quantized("w4a16-asym", bias=True)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    quantkern.fuse_projections(model)
    with torch.no_grad():
        fused_logits = model(INPUT_IDS).logits
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[key], before[key]) for key in before)
    qconfig = io.quantization_config(method="rtn", bits=4, group_size=32, symmetric=False)
    io.save_quantized(model, tmp_path / "ckpt", qconfig, {"tag": "test"})
    loaded, _ = io.load_quantized(tmp_path / "ckpt")
    assert all(m._fusion is None for m in loaded.modules() if isinstance(m, QuantLinear))
    with torch.no_grad():
        torch.testing.assert_close(loaded(INPUT_IDS).logits, fused_logits, rtol=1e-5, atol=1e-5)


def test_greedy_generation_is_unchanged():
    model = quantized("w4a4")
    with torch.no_grad():
        expected = model.generate(INPUT_IDS, max_new_tokens=6, do_sample=False)
        expected_logits = model(INPUT_IDS).logits
    quantkern.fuse_projections(model)
    with torch.no_grad():
        assert torch.equal(model.generate(INPUT_IDS, max_new_tokens=6, do_sample=False), expected)
    with torch.inference_mode():  # inference tensors have no version counter to read
        torch.testing.assert_close(model(INPUT_IDS).logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_siblings_that_differ_or_are_not_all_quantized_stay_separate():
    model = quantized("w4a4")
    model.model.layers[0].self_attn.k_proj.act_clip_ratio = 1.0
    model.model.layers[1].mlp.up_proj = torch.nn.Linear(64, 128, bias=False)
    report = quantkern.fuse_projections(model)
    assert report["fused"] == ["model.layers.0.mlp.{gate_proj,up_proj}",
                               "model.layers.1.self_attn.{q_proj,k_proj,v_proj}"]
    assert report["skipped"] == {
        "model.layers.0.self_attn.{q_proj,k_proj,v_proj}": "the layers differ in act_clip_ratio",
        "model.layers.1.mlp.{gate_proj,up_proj}": "not every layer of the group is a QuantLinear"}
    assert model.model.layers[0].self_attn.q_proj._fusion is None
    assert model.model.layers[1].mlp.gate_proj._fusion is None


def test_fusing_again_keeps_fused_groups_and_regroups_a_replaced_layer():
    model = quantized("w4a16")
    quantkern.fuse_projections(model)
    attention = model.model.layers[0].self_attn
    fusion = attention.q_proj._fusion[0]
    assert len(quantkern.fuse_projections(model)["fused"]) == 4 and attention.q_proj._fusion[0] is fusion
    torch.manual_seed(1)
    attention.k_proj = QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False), 4, 32)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected_k = attention.k_proj(x)  # runs alone: not fused yet
        assert len(quantkern.fuse_projections(model)["fused"]) == 4
        new_fusion = attention.q_proj._fusion[0]
        assert new_fusion is not fusion and new_fusion.members[1] is attention.k_proj
        attention.q_proj(x)
        torch.testing.assert_close(attention.k_proj(x), expected_k, rtol=1e-5, atol=1e-6)
    # A sibling left out of the new group (another kind of layer now) no longer runs in the old one.
    attention.k_proj = torch.nn.Linear(64, 32)
    assert quantkern.fuse_projections(model)["skipped"] == {
        "model.layers.0.self_attn.{q_proj,k_proj,v_proj}": "not every layer of the group is a QuantLinear"}
    assert attention.q_proj._fusion is None and attention.v_proj._fusion is None


def test_the_group_runs_where_its_layers_were_prepared():
    """Once prepared on a GPU, a layer's canonical buffers are parked in host memory: the group must still
    stack its weights where the layers ran (faked here: no GPU), not where the buffers are."""
    from types import SimpleNamespace

    from quantkern.nn import kernel_device

    model = quantized("w4a16")
    mlp = model.model.layers[0].mlp
    gpu = torch.device("cuda", 0)
    for layer in (mlp.gate_proj, mlp.up_proj):
        layer._prepared = SimpleNamespace(device=gpu)
    assert kernel_device(mlp.gate_proj) == gpu and mlp.gate_proj.qweight.device.type == "cpu"
    quantkern.fuse_projections(model)
    assert mlp.gate_proj._fusion[0].device == gpu and mlp.gate_proj._prepared is None
    assert model.model.layers[0].self_attn.q_proj._fusion[0].device == torch.device("cpu")


def test_members_reading_different_inputs_are_right_and_warned_about():
    model = quantized("w4a16")
    attention = model.model.layers[0].self_attn
    x, y = torch.randn(3, 64), torch.randn(5, 64)
    with torch.no_grad():
        expected = attention.q_proj(x), attention.k_proj(y), attention.v_proj(y)
        quantkern.fuse_projections(model)
        with pytest.warns(UserWarning, match="called with different inputs"):
            got = attention.q_proj(x), attention.k_proj(y), attention.v_proj(y)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_deepcopy_of_a_fused_model_mid_step():
    import copy

    model = quantized("w4a16")
    quantkern.fuse_projections(model)
    x = torch.randn(3, 64)
    model.model.layers[0].self_attn.q_proj(x)  # with autograd on: pending outputs are non-leaf tensors
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].self_attn.q_proj._fusion[0]._pending is None
    with torch.no_grad():
        torch.testing.assert_close(twin(INPUT_IDS).logits, model(INPUT_IDS).logits, rtol=0, atol=0)


def test_a_member_called_alone_or_after_an_in_place_change_is_still_right():
    model = quantized("w4a16")
    attention = model.model.layers[0].self_attn
    x, y = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        expected = {role: getattr(attention, role)(x) for role in ("q_proj", "k_proj", "v_proj")}
        expected_y_k = attention.k_proj(y)
        quantkern.fuse_projections(model)
        torch.testing.assert_close(attention.q_proj(x), expected["q_proj"], rtol=1e-5, atol=1e-6)
        with pytest.warns(UserWarning, match="called with different inputs"):  # another input
            torch.testing.assert_close(attention.k_proj(y), expected_y_k, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(attention.v_proj(x), expected["v_proj"], rtol=1e-5, atol=1e-6)
        attention.q_proj(y)
        y.copy_(x)  # in place: the outputs computed from y's old values are stale
        torch.testing.assert_close(attention.k_proj(y), expected["k_proj"], rtol=1e-5, atol=1e-6)
    with torch.inference_mode():  # no version counter: a member asking twice starts a new pass
        buffer = torch.randn(3, 64)
        attention.k_proj(buffer)
        buffer.copy_(x)
        torch.testing.assert_close(attention.k_proj(buffer), expected["k_proj"], rtol=1e-5, atol=1e-6)


def test_prepare_on_a_member_prepares_the_stacked_weight_for_the_whole_group():
    """On the Triton backend (the CPU interpreter without a GPU): one prepared weight of q+k+v's rows, a
    backend chosen on one member applies to all, and the group's output is each layer's."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    linears = [torch.nn.Linear(64, n, bias=True) for n in (64, 32, 32)]
    layers = [QuantLinear.from_linear(linear, 4, 32).to(device) for linear in linears]
    attention = torch.nn.Module()
    for role, layer in zip(("q_proj", "k_proj", "v_proj"), layers):
        setattr(attention, role, layer)
    x = torch.randn(5, 64, dtype=torch.float16).to(device)
    expected = [ops.weight_only_linear(x.float(), layer.weight, layer.bias.float(), backend="reference")
                for layer in layers]
    assert quantkern.fuse_projections(attention)["fused"] == ["{q_proj,k_proj,v_proj}"]
    layers[1].prepare(torch.float16, backend="triton")
    fusion = layers[0]._fusion[0]
    prepared = fusion.prepared
    for layer in layers:  # as a loop over the model's QuantLinear layers does: the group is prepared once
        layer.prepare(torch.float16)
    assert fusion.prepared is prepared
    assert [layer.backend for layer in layers] == ["triton"] * 3 and all(layer._prepared is None for layer in layers)
    assert (fusion.prepared.backend, fusion.prepared.out_features) == ("triton", 128)
    for layer, want in zip(layers, expected):
        torch.testing.assert_close(layer(x).float(), want, rtol=2e-3, atol=2e-3)
    assert "fused: part 2 of 3" in repr(layers[1])


def test_fusing_something_that_is_not_a_model_is_a_type_error():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got dict"):  # was an AttributeError
        quantkern.fuse_projections({})
