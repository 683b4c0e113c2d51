"""Greedy decoding with every step replayed from one CUDA graph over a static KV cache.

Eager HF ``generate`` spends most of a decode step in Python (about 70 ms a token for an 8B model on the
H100, docs/PERF.md), so it cannot show what the kernels do. Here the prompt is prefilled eagerly into a
``transformers.StaticCache`` (fixed addresses), one decode step (the model, or a ``torch.compile`` wrapper
of it) is captured in a CUDA graph, and each further token is one replay. Our ops support both: they are
``torch.library`` ops with fake implementations, allocate nothing but their outputs and workspaces
from torch's allocator, and sync nothing.

Used by ``quantkern generate --cuda-graph``, ``quantkern eval`` on a GPU, benchmarks/bench_e2e.py and the
GPU tests.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

import torch

from .kv_cache import cache_argument_name, kv_quantization_settings


def capture_refusal(model) -> Optional[str]:
    """Why ``model``'s decode step cannot be captured in a CUDA graph over a static KV cache, or None."""
    if kv_quantization_settings(model) is not None:
        return ("this model quantizes its KV cache (quantkern.kv_cache.QuantKVCache grows by concatenation: it "
                "cannot be captured); decode it with generate")
    return None


class GraphDecoder:
    """One greedy decode step over a static KV cache, captured in a CUDA graph. ``forward`` runs the
    decode step (the model itself, or a compiled wrapper of it); the prefill runs the model itself.
    ``max_len``: the cache's length, at least the prompt plus the tokens decoded plus the 2 warm-up
    steps of ``capture``."""

    def __init__(self, model, batch: int, max_len: int, forward=None):
        from transformers import StaticCache

        self.model = model
        self.forward = model if forward is None else forward
        self.device = next(model.parameters()).device
        refusal = capture_refusal(model)
        if refusal is not None:
            raise ValueError(f"CUDA-graph decoding needs a static KV cache: {refusal}")
        if self.device.type != "cuda":
            raise ValueError(f"CUDA-graph decoding needs the model on a CUDA device, not {self.device}")
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        # ``cache`` from transformers 5.24 on (``past_key_values`` there is deprecated, warns, and goes in 5.40).
        self.cache_keyword = cache_argument_name(model.forward)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.position = torch.zeros(1, dtype=torch.long, device=self.device)
        self.graph = None

    def _step(self):
        logits = self.forward(input_ids=self.ids, **{self.cache_keyword: self.cache}, cache_position=self.position,
                              use_cache=True).logits
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Run the prompt [batch, T] through the model; ``ids`` then holds the first new token."""
        # Empty the cache in place (static addresses, which a captured graph holds): transformers'
        # static layers count written tokens on the device and write there, whatever cache_position says.
        self.cache.reset()
        positions = torch.arange(prompt.shape[1], device=self.device)
        logits = self.model(input_ids=prompt, **{self.cache_keyword: self.cache}, cache_position=positions,
                            use_cache=True).logits
        self.ids.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.fill_(prompt.shape[1])

    @torch.no_grad()
    def capture(self) -> float:
        """Capture the decode step; returns the seconds of its first (warm-up) run, which compiles it.
        The warm-up steps advance the cache: prefill again before decoding."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up outside capture (allocator, lazy init, compilation)
            start = time.perf_counter()
            self._step()
            torch.cuda.synchronize(self.device)
            first_step_s = time.perf_counter() - start
            self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.next_ids = self._step()
        return first_step_s

    @torch.no_grad()
    def decode(self, steps: int, use_graph: bool) -> list:
        """``steps`` further tokens ([batch, 1] each), from the graph or eagerly."""
        tokens = []
        for _ in range(steps):
            if use_graph:
                self.graph.replay()
                next_ids = self.next_ids
            else:
                next_ids = self._step()
            self.ids.copy_(next_ids)
            self.position.add_(1)
            tokens.append(next_ids.clone())
        return tokens


class Decoded(NamedTuple):
    tokens: torch.Tensor  # [batch, n] new tokens (n <= max_new_tokens: fewer if every row reached eos)
    capture_s: float      # two prefills, the warm-up steps (compiling, with a torch.compile wrapper), the capture
    decode_s: float       # the replays of the tokens after the first


@torch.no_grad()
def greedy_decode(model, prompt: torch.Tensor, max_new_tokens: int, forward=None,
                  eos_token_id: Optional[int] = None, streamer=None) -> Decoded:
    """Greedy decoding of ``prompt`` [batch, T] on the model's CUDA device: the first new token from the
    prefill, each further one a CUDA-graph replay of ``forward`` (default: the model). Stops after
    ``max_new_tokens``, or once every row has produced ``eos_token_id`` (which costs one small device-to-host
    copy a step); a row that ends before the others reads ``eos_token_id`` from its eos on. ``streamer``
    (e.g. ``transformers.TextStreamer``, batch 1) gets the prompt, then each token."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, tokens] with at least one token, got {tuple(prompt.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    decoder = GraphDecoder(model, prompt.shape[0], prompt.shape[1] + max_new_tokens + 2, forward)
    prompt = prompt.to(decoder.device)
    start = time.perf_counter()
    decoder.prefill(prompt)
    decoder.capture()
    decoder.prefill(prompt)  # the capture's warm-up steps moved the cache on
    torch.cuda.synchronize(decoder.device)
    capture_s = time.perf_counter() - start
    if streamer is not None:
        streamer.put(prompt.cpu())
    tokens = [decoder.ids.clone()]
    finished = torch.zeros(prompt.shape[0], dtype=torch.bool, device=decoder.device)

    def emit(token):
        nonlocal finished
        if eos_token_id is not None:
            # A row that has produced eos has ended: what the model decodes after it (the other rows going on)
            # is not its text, so it reads eos there, as generate pads finished rows.
            token.masked_fill_(finished[:, None], eos_token_id)
            finished = finished | (token[:, 0] == eos_token_id)
        if streamer is not None:
            streamer.put(token.cpu())
        return eos_token_id is not None and bool(finished.all())

    start = time.perf_counter()
    done = emit(tokens[0])
    while not done and len(tokens) < max_new_tokens:
        tokens.extend(decoder.decode(1, use_graph=True))
        done = emit(tokens[-1])
    torch.cuda.synchronize(decoder.device)
    decode_s = time.perf_counter() - start
    if streamer is not None:
        streamer.end()
    return Decoded(torch.cat(tokens, dim=1), capture_s, decode_s)
