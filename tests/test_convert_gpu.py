"""Converted checkpoints (quantkern.convert) on the GPU: GPTQ (act-order too), AWQ and compressed-tensors
(W4A16, W8A8, W4A4) layers, loaded from the converted files, give through our CUDA kernels the logits of the
reference path on the same device. tests/test_convert*.py check, on the CPU, that the converted model computes
exactly what the source computes; this adds that the kernels run what was converted (the input permutation of
act-order layers included)."""

import pytest
import torch
from test_convert import IDS, quantized_llama as quantized_llama_w4, write_act_order_gptq, write_source
from test_convert_compressed_tensors import quantized_llama, write_compressed_tensors

from quantkern import backends
from quantkern.convert import convert_checkpoint
from quantkern.io import load_quantized
from quantkern.nn import QuantLinear

pytestmark = pytest.mark.gpu


def sources():
    """(id, function writing the source checkpoint into a directory, the kernel its layers need)."""
    return [
        ("gptq-v1-asym-g32", lambda d: write_source(quantized_llama_w4(False, 32), d, "gptq", layout="gptq"),
         "weight_only_linear"),
        ("gptq-act-order", write_act_order_gptq, "weight_only_linear"),
        ("awq-g128", lambda d: write_source(quantized_llama_w4(False, 128), d, "awq", layout="gemm"),
         "weight_only_linear"),
        ("ct-w4a16-g128", lambda d: write_compressed_tensors(quantized_llama(4, 128), d), "weight_only_linear"),
        ("ct-w8a8", lambda d: write_compressed_tensors(quantized_llama(8, -1, act_bits=8), d), "w8a8_linear"),
        ("ct-w4a4", lambda d: write_compressed_tensors(quantized_llama(4, -1, act_bits=4), d), "w4a4_linear"),
    ]


@pytest.mark.parametrize("write, kernel", [case[1:] for case in sources()], ids=[case[0] for case in sources()])
def test_converted_checkpoint_runs_on_the_cuda_kernels(tmp_path, write, kernel):
    if kernel not in backends.status("cuda").kernels:
        pytest.skip(f"no CUDA {kernel}: {backends.status('cuda').reason}")
    write(tmp_path / "src")
    model, _ = load_quantized(convert_checkpoint(tmp_path / "src", tmp_path / "dst"))
    model = model.to("cuda", torch.float16)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    ids = IDS.to("cuda")
    results = {}
    for backend in ("reference", "cuda"):
        for layer in layers:
            layer.prepare(torch.float16, backend)
        with torch.no_grad():
            results[backend] = model(ids).logits.float()
    assert all(layer._prepared.backend == "cuda" for layer in layers)
    ref, got = results["reference"], results["cuda"]
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2
