"""Quantized KV cache for Hugging Face models (QuaRot's KV4 / KV8).

Keys (after RoPE) and values are quantized per (token, head) over head_dim, asymmetrically, to 4 or
8 bits; ``reference.quantize_kv`` / ``reference.dequantize_kv`` define the numbers.

Two pieces:

* ``QuantKVCache``, a ``transformers`` ``Cache`` whose layers (``QuantKVLayer``) store only uint8
  codes (4-bit packed two per byte) plus one scale and one offset per (batch, head, token), in the
  model's dtype. ``update`` quantizes the new tokens, appends them, and returns the dequantized keys
  and values of *all* tokens, the current ones included: attention always sees quantized K/V, as
  QuaRot simulates it. Per-token groups make the codes appendable, so there is no re-quantization
  and no full-precision residual window.

* ``enable_kv_quantization(model, bits)``, which makes every forward of ``model`` use it with no
  special caller code:

  - a forward pre-hook on the decoder (``model.base_model``) puts a fresh ``QuantKVCache`` where
    the cache argument is None, so a plain ``model(input_ids)`` (with or without ``use_cache``;
    perplexity evaluation) attends to quantized K/V too (with ``use_cache=False`` a forward hook
    keeps that one-off cache out of the output, as transformers returns none then);
  - ``generate`` gets a ``QuantKVCache`` instead of its default ``DynamicCache`` (the model's
    ``_prepare_cache_for_generation`` is wrapped, on this instance only);
  - any other cache passed in explicitly (``DynamicCache``, ``StaticCache``) is refused with a clear
    error: it would hold, and hand to attention, unquantized keys and values.

  The settings are recorded on ``model.config`` (``quantkern_kv_cache``) and in a checkpoint's
  ``quantization_config`` (``kv_bits``, ``kv_rotate_keys``), from which ``io.load_quantized``
  restores them.

Why not a registered attention function (``transformers.AttentionInterface``): attention functions
are not given the cache, so they cannot tell keys that came out of a quantized cache from fresh
full-precision ones, and would quantize the cached ones a second time; the cache is also the only
place where the memory saving is real. Hooking the decoder works for every attention
implementation (eager, sdpa, flash) of the Llama-like families (Llama, SmolLM2, Qwen2/3, Mistral).

``rotate_keys=True`` (QuaRot rotates queries and keys by a Hadamard matrix ``H`` over head_dim after
RoPE): the cache quantizes ``H k`` and hands attention ``H^T deq(Q(H k))``. As ``H`` is orthonormal,
``q . H^T deq = (H q) . deq``: the scores equal those of rotated queries against rotated quantized
keys, with no change to the model's code. Values are not rotated (QuaRot folds that rotation into
v_proj / o_proj weights, which is a weight transformation, not a cache one).

Full-attention and sliding-window layers are supported (a sliding layer keeps every token; the
model's mask hides those outside the window); other layer types (linear attention, chunked) raise.
The cache is not ``torch.compile``-able (it grows by concatenation, like ``DynamicCache``).

The cache argument's name depends on the transformers version: ``past_key_values`` up to 5.23,
``cache`` from 5.24 on (forwards' parameter, model outputs' field, ``generate``'s model_kwargs key;
the old keyword is still accepted, deprecated). Everything here works with both, deciding per
forward from its signature (``cache_argument_name``) or from what a call or an output holds
(``output_cache``), never from a version number.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, get_layer_types_and_kwargs

from . import ops, reference
from .format import check_bits
from .rotation import hadamard_transform, is_hadamard_size

__all__ = ["CACHE_ARGUMENT_NAMES", "CONFIG_ATTR", "QuantKVCache", "QuantKVLayer", "cache_argument_name",
           "disable_kv_quantization", "enable_kv_quantization", "kv_quantization_settings", "output_cache"]

CONFIG_ATTR = "quantkern_kv_cache"  # model.config attribute: {"bits": 4, "rotate_keys": False}
_STATE_ATTR = "_quantkern_kv_state"  # per-model: settings and the hook handle

# The names under which transformers passes (and returns) the KV cache, newest first: ``cache``
# (5.24 on), ``past_key_values`` (before; still accepted by 5.24's forwards as a deprecated keyword),
# ``past_key_value`` (attention modules of transformers 4.x).
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values", "past_key_value")


class QuantKVLayer(CacheLayerMixin):
    """One attention layer's quantized keys and values, shapes ``[batch, kv_heads, tokens, ...]``:
    codes uint8 ``[..., head_dim / 2]`` (4-bit) or ``[..., head_dim]`` (8-bit); scales and offsets
    ``[batch, kv_heads, tokens]`` in the model's dtype."""

    is_sliding = False
    is_croppable = True
    _TENSORS = ("key_codes", "key_scales", "key_offsets", "value_codes", "value_scales", "value_offsets")

    def __init__(self, bits: int = 4, rotate_keys: bool = False, backend: Optional[str] = None):
        super().__init__()
        self.bits = check_bits(bits)
        self.rotate_keys = bool(rotate_keys)
        self.backend = backend
        self.cumulative_length = 0
        for name in self._TENSORS:
            setattr(self, name, None)

    def __repr__(self):
        return f"QuantKVLayer(bits={self.bits}, rotate_keys={self.rotate_keys}, tokens={self.cumulative_length})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        for prefix, states in (("key", key_states), ("value", value_states)):
            batch, heads, _, head_dim = states.shape
            if self.bits == 4 and head_dim % 2:
                raise ValueError(f"4-bit KV quantization needs an even head_dim, got {head_dim}")
            if prefix == "key" and self.rotate_keys and not is_hadamard_size(head_dim):
                raise ValueError(f"rotate_keys needs a Hadamard matrix of order head_dim={head_dim}")
            packed = head_dim // 2 if self.bits == 4 else head_dim
            setattr(self, f"{prefix}_codes", states.new_empty(batch, heads, 0, packed, dtype=torch.uint8))
            setattr(self, f"{prefix}_scales", states.new_empty(batch, heads, 0))
            setattr(self, f"{prefix}_offsets", states.new_empty(batch, heads, 0))
        self.is_initialized = True

    def _append(self, prefix: str, states: torch.Tensor) -> None:
        codes, scales, offsets = ops.quantize_kv(states, self.bits, backend=self.backend)
        setattr(self, f"{prefix}_codes", torch.cat([getattr(self, f"{prefix}_codes"), codes], dim=-2))
        setattr(self, f"{prefix}_scales", torch.cat([getattr(self, f"{prefix}_scales"), scales], dim=-1))
        setattr(self, f"{prefix}_offsets", torch.cat([getattr(self, f"{prefix}_offsets"), offsets], dim=-1))

    def _dequantized(self, prefix: str) -> torch.Tensor:
        return reference.dequantize_kv(getattr(self, f"{prefix}_codes"), getattr(self, f"{prefix}_scales"),
                                       getattr(self, f"{prefix}_offsets"), self.bits, self.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Quantize and store the new tokens; return the dequantized keys and values of all tokens
        (``[batch, kv_heads, all tokens, head_dim]``, in the model's dtype)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.rotate_keys:
            # ops.hadamard raises MissingKernelError on CUDA with no kernel (as ops.quantize_kv does),
            # so the inverse below, plain PyTorch, only runs where the forward transform may. (On a
            # GPU both have kernels: csrc/hadamard.cu and triton_kernels/kv_quant.py.)
            key_states = ops.hadamard(key_states, backend=self.backend)
        self._append("key", key_states)
        self._append("value", value_states)
        self.cumulative_length += key_states.shape[-2]
        keys = self._dequantized("key")
        if self.rotate_keys:
            keys = hadamard_transform(keys, normalize=True, transpose=True)  # H^T: undo the rotation
        return keys, self._dequantized("value")

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.cumulative_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes held by the stored codes, scales and offsets."""
        tensors = [getattr(self, name) for name in self._TENSORS]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def _map(self, fn) -> None:
        if self.is_initialized:
            for name in self._TENSORS:
                setattr(self, name, fn(getattr(self, name)))

    def reset(self) -> None:
        for name in self._TENSORS:
            setattr(self, name, None)
        self.cumulative_length = 0
        self.is_initialized = False

    def offload(self):
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (a negative count, as ``DynamicLayer.crop``)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        keep = max(self.cumulative_length + tokens_to_remove, 0)
        for name in self._TENSORS:
            t = getattr(self, name)
            setattr(self, name, t[..., :keep, :] if name.endswith("codes") else t[..., :keep])
        self.cumulative_length = keep

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        # Per-token groups: reordering the batch reorders codes, scales and offsets alike, exactly.
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices, ...])


# Sliding-window layers work unchanged: the cache keeps every token, and the model's sliding mask,
# built from absolute positions, hides the ones outside the window (memory is not bounded by it).
SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention")


def _check_layer_types(config) -> None:
    layer_types, _ = get_layer_types_and_kwargs(config)
    other = sorted(set(layer_types) - set(SUPPORTED_LAYER_TYPES))
    if other:
        raise NotImplementedError(f"quantkern's quantized KV cache supports {SUPPORTED_LAYER_TYPES} layers; "
                                  f"this model also has {other}")


class QuantKVCache(Cache):
    """A ``Cache`` of ``QuantKVLayer``: one per decoder layer when ``config`` is given, else created
    as layers are first updated."""

    _temporary = False  # True: made for one forward with use_cache off (see _drop_temporary_cache)

    def __init__(self, config=None, bits: int = 4, rotate_keys: bool = False, backend: Optional[str] = None):
        check_bits(bits)
        self.bits, self.rotate_keys = bits, bool(rotate_keys)
        make_layer = functools.partial(QuantKVLayer, bits, rotate_keys, backend)
        if config is None:
            super().__init__(layer_class_to_replicate=make_layer)
        else:
            config = config.get_text_config(decoder=True)
            _check_layer_types(config)
            super().__init__(layers=[make_layer() for _ in range(config.num_hidden_layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)


# ----------------------------------------------------------------------------------------------
# Making a model use it everywhere
# ----------------------------------------------------------------------------------------------

def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_quantization_settings(model) -> Optional[dict]:
    """``{"bits": ..., "rotate_keys": ...}`` if ``model`` has KV quantization enabled, else None."""
    state = getattr(model, _STATE_ATTR, None)
    return None if state is None else dict(state["settings"])


def cache_argument_name(forward) -> str:
    """The name under which ``forward`` (a module's bound ``forward``) takes the KV cache, read from
    its signature: ``cache`` (transformers >= 5.24), ``past_key_values`` (older) or
    ``past_key_value`` (attention modules of transformers 4.x). Raises ``TypeError`` if it takes
    none of them."""
    parameters = inspect.signature(forward).parameters
    for name in CACHE_ARGUMENT_NAMES:
        if name in parameters:
            return name
    raise TypeError(f"{getattr(forward, '__qualname__', forward)} takes no cache argument "
                    f"({' / '.join(CACHE_ARGUMENT_NAMES)}); quantkern's KV quantization cannot hook it")


def _output_cache_field(output) -> Optional[str]:
    # A ModelOutput's keys are its fields that are not None; a tuple output (return_dict=False) has none.
    keys = output.keys() if hasattr(output, "keys") else ()
    return next((name for name in CACHE_ARGUMENT_NAMES if name in keys), None)


def output_cache(output):
    """The cache that a model output or a ``generate`` output holds (its ``cache`` field with
    transformers >= 5.24, ``past_key_values`` before), or None."""
    name = _output_cache_field(output)
    return None if name is None else output[name]


def _cache_argument(module, args, kwargs):
    """Where the cache is in a forward call of ``module``: ``(where, value)``, ``where`` being the
    keyword it was passed under (the one ``forward`` takes, or a deprecated one it still accepts),
    or else its position in ``args``, or else the keyword ``forward`` takes (value None)."""
    name = cache_argument_name(module.forward)
    for key in (name,) + tuple(other for other in CACHE_ARGUMENT_NAMES if other != name):
        if key in kwargs:
            return key, kwargs[key]
    position = list(inspect.signature(module.forward).parameters).index(name)
    if position < len(args):
        return position, args[position]
    return name, None


def _use_quantized_cache(new_cache, module, args, kwargs):
    where, cache = _cache_argument(module, args, kwargs)
    if isinstance(cache, QuantKVCache):
        return None
    if cache is not None:
        raise TypeError(
            f"KV quantization is enabled on this model (quantkern.kv_cache), but the cache argument "
            f"(past_key_values / cache) is a {type(cache).__name__}, which would hold unquantized keys and "
            f"values. Pass no cache (forward and generate then use a QuantKVCache) or a "
            f"quantkern.kv_cache.QuantKVCache; disable_kv_quantization(model) to use other caches.")
    cache = new_cache()
    use_cache = kwargs.get("use_cache")
    # With use_cache off, the cache only serves this forward: mark it for _drop_temporary_cache.
    cache._temporary = not (use_cache if use_cache is not None else getattr(module.config, "use_cache", True))
    if isinstance(where, str):
        kwargs[where] = cache
        return args, kwargs
    args = args[:where] + (cache,) + args[where + 1:]
    return args, kwargs


def _drop_temporary_cache(module, args, kwargs, output):
    # A forward with use_cache off returns no cache (transformers' behaviour): generate(use_cache=False)
    # would otherwise feed it back into the next step, which passes the whole sequence again.
    _, cache = _cache_argument(module, args, kwargs)
    field = _output_cache_field(output)
    if getattr(cache, "_temporary", False) and field is not None and output[field] is cache:
        return type(output)(**{key: value for key, value in output.items() if key != field})
    return output


def _prepare_quantized_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    # Let transformers make its usual choice, then swap its default DynamicCache for ours, under
    # whichever key it used (``cache`` or ``past_key_values``). A cache the caller passed in is
    # theirs: the decoder's hook accepts it only if it is a QuantKVCache.
    result = type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs)
    for name in CACHE_ARGUMENT_NAMES:
        cache = model_kwargs.get(name)
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs[name] = getattr(self, _STATE_ATTR)["new_cache"]()
    return result


def enable_kv_quantization(model, bits: int = 4, rotate_keys: bool = False, backend: Optional[str] = None):
    """Make ``model`` (a Hugging Face causal LM) quantize its keys and values to ``bits`` (4 or 8)
    in every forward and in ``generate``; see the module docstring. Idempotent: calling it again
    replaces the settings. ``backend`` is passed to ``ops.quantize_kv`` / ``ops.hadamard`` (None:
    automatic: on CUDA tensors the Triton KV quantizer, and ``MissingKernelError`` where Triton is absent).
    Returns ``model``."""
    check_bits(bits)
    config = model.config.get_text_config(decoder=True)
    _check_layer_types(config)
    head_dim = _head_dim(config)
    if bits == 4 and head_dim % 2:
        raise ValueError(f"4-bit KV quantization needs an even head_dim, got {head_dim}")
    if rotate_keys and not is_hadamard_size(head_dim):
        raise ValueError(f"rotate_keys needs a Hadamard matrix of order head_dim={head_dim} "
                         f"(2^k or 12/20/28/36/40 x 2^k)")
    cache_argument_name(model.base_model.forward)  # a decoder the hook can give a cache to, or TypeError
    disable_kv_quantization(model)
    settings = {"bits": bits, "rotate_keys": bool(rotate_keys)}
    new_cache = functools.partial(QuantKVCache, model.config, bits, rotate_keys, backend)
    hooks = (model.base_model.register_forward_pre_hook(functools.partial(_use_quantized_cache, new_cache),
                                                        with_kwargs=True),
             model.base_model.register_forward_hook(_drop_temporary_cache, with_kwargs=True))
    setattr(model, _STATE_ATTR, {"settings": settings, "hooks": hooks, "new_cache": new_cache})
    if hasattr(type(model), "_prepare_cache_for_generation"):  # a GenerationMixin model
        model._prepare_cache_for_generation = types.MethodType(_prepare_quantized_cache_for_generation, model)
    setattr(model.config, CONFIG_ATTR, dict(settings))
    return model


def disable_kv_quantization(model):
    """Undo ``enable_kv_quantization`` (a no-op where it is not enabled). Returns ``model``."""
    state = getattr(model, _STATE_ATTR, None)
    if state is not None:
        for hook in state["hooks"]:
            hook.remove()
        delattr(model, _STATE_ATTR)
    model.__dict__.pop("_prepare_cache_for_generation", None)
    if hasattr(model.config, CONFIG_ATTR):
        delattr(model.config, CONFIG_ATTR)
    return model
