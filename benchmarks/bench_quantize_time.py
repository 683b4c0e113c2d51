"""How long a quantizer takes on a Llama-3-8B-shaped model with random weights, block by block on a GPU.

Random weights are enough to time the work (the Hessians, Cholesky factorizations and block
forwards cost the same whatever the values); calibration windows are random token ids. The model
stays in host memory in bf16; the driver moves one block at a time to the device, so peak GPU
memory shows what a smaller card needs.

    python benchmarks/bench_quantize_time.py --method gptq --samples 128 --seq-len 512 [--layers 32]

Prints one line of JSON: seconds in total and per block, peak GPU memory, settings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, tie_word_embeddings=False)


def random_llama(layers: int, dtype=torch.bfloat16):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**LLAMA3_8B, "num_hidden_layers": layers})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32).mul_(0.02))
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its inv_freq buffer was left empty on meta
    return model.eval()


def main(argv=None) -> int:
    import quantkern
    from quantkern.quantizers import QuantizeConfig, quantize_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import commit_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="gptq")
    parser.add_argument("--layers", type=int, default=32, help="decoder blocks (Llama-3-8B: 32)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    model = random_llama(args.layers)
    build_s = time.perf_counter() - start
    windows = torch.randint(0, LLAMA3_8B["vocab_size"], (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(1))
    if torch.device(args.device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config = QuantizeConfig(method=args.method, bits=4, group_size=args.group_size, scale_dtype=torch.bfloat16,
                            calib_windows=windows, device=args.device)
    start = time.perf_counter()
    result = quantize_model(model, None, config, progress=True)
    seconds = time.perf_counter() - start
    report = {
        "method": args.method, "layers": args.layers, "samples": args.samples, "seq_len": args.seq_len,
        "group_size": args.group_size, "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "quantize_s": round(seconds, 1), "per_block_s": round(seconds / args.layers, 2),
        "projected_32_blocks_s": round(seconds / args.layers * 32, 1), "build_model_s": round(build_s, 1),
        "timings_s": result.timings_s, "torch": torch.__version__, "quantkern": quantkern.__version__,
    }
    report["commit"], report["dirty"] = commit_info()
    if args.device == "cuda":
        report["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
