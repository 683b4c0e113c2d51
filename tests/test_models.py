"""quantkern.models finds decoder blocks by structure in Llama, Mistral, Qwen2, Qwen3 (and SmolLM2)
and names what it does not understand."""

import pytest
import torch
from torch import nn

from quantkern.models import SEQUENTIAL_GROUPS, UnsupportedModelError, model_structure

SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_model(kind: str):
    import transformers

    config_class = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                    "qwen3": "Qwen3Config"}[kind]
    config = getattr(transformers, config_class)(**SMALL, **({"head_dim": 16} if kind == "qwen3" else {}))
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])
def test_structure_of_supported_families(kind):
    model = tiny_model(kind)
    s = model_structure(model)
    assert len(s.blocks) == 2 and s.hidden_size == 64
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 2, 16)
    block = s.blocks[1]
    layer = model.model.layers[1]
    assert block.module is layer
    assert block.linears["q_proj"] is layer.self_attn.q_proj and block.linears["down_proj"] is layer.mlp.down_proj
    assert block.norms["input_layernorm"] is layer.input_layernorm
    assert block.norms["post_attention_layernorm"] is layer.post_attention_layernorm
    assert block.linear_names["o_proj"] == "model.layers.1.self_attn.o_proj"
    assert s.final_norm is model.model.norm and s.lm_head is model.lm_head
    assert s.embed_tokens is model.model.embed_tokens
    assert sorted(r for group in SEQUENTIAL_GROUPS for r in group) == sorted(block.linears)


def test_replace_linear_updates_block_and_model():
    model = tiny_model("llama")
    block = model_structure(model).blocks[0]
    new = nn.Linear(64, 64, bias=False)
    block.replace_linear("o_proj", new)
    assert model.model.layers[0].self_attn.o_proj is new and block.linears["o_proj"] is new


def test_unknown_linear_in_a_block_is_named():
    model = tiny_model("llama")
    model.model.layers[1].mlp.extra_proj = nn.Linear(64, 64)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.1\.mlp\.extra_proj: a Linear with no known role"):
        model_structure(model)


def test_missing_norm_is_named():
    model = tiny_model("qwen2")
    del model.model.layers[0].post_attention_layernorm
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.post_attention_layernorm: missing"):
        model_structure(model)


def test_other_architectures_are_refused_with_the_module_named():
    import transformers

    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=128, hidden_size=64, ffn_dim=96, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64))
    with pytest.raises(UnsupportedModelError, match=r"model\.decoder\.layers\.0: no child module with Linears"):
        model_structure(opt)
    with pytest.raises(UnsupportedModelError, match="no nn.ModuleList of decoder blocks"):
        model_structure(nn.Sequential(nn.Linear(4, 4)))


def test_sandwich_norms_are_refused_with_the_norm_named():
    # Gemma2: post_attention_layernorm normalises the attention output and pre_feedforward_layernorm feeds
    # the MLP, so taking post_attention_layernorm as the MLP's input norm would fold scales wrongly.
    import transformers

    config = transformers.Gemma2Config(**SMALL, head_dim=16)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError,
                       match=r"model\.layers\.0\.pre_feedforward_layernorm: a norm over the hidden size with no known"):
        model_structure(model)
    # Qwen3's per-head q_norm/k_norm (over head_dim) are not such norms.
    assert len(model_structure(tiny_model("qwen3")).blocks) == 2
