"""What quantkern needs to know of a Hugging Face decoder-only model, found by structure.

A model is understood when it has one ``nn.ModuleList`` of decoder blocks and every block holds
an attention module with ``q_proj``/``k_proj``/``v_proj``/``o_proj``, a gated MLP with
``gate_proj``/``up_proj``/``down_proj``, and the two pre-norms ``input_layernorm`` (before
attention) and ``post_attention_layernorm`` (before the MLP). Those attribute names are the
structure that Llama, Mistral, Qwen2, Qwen3 and SmolLM2 share; nothing here looks at the model's
class or ``model_type``. Anything else in a block that holds weights (for example Qwen3's per-head
``q_norm``/``k_norm``, which act on head outputs and need no special care) is allowed as long as it
is not an ``nn.Linear``: an unknown Linear is an error that names it, because a quantizer that
skipped it silently would leave a layer in fp16 or fold a scale into the wrong place. So is a third
norm over the hidden size (Gemma2/Gemma3's sandwich norms, where ``post_attention_layernorm`` is not
the MLP's input norm). The norms' form is the methods' concern: those that fold into them (AWQ,
SmoothQuant, QuaRot) check it and refuse, e.g., Gemma's ``1 + weight``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

from torch import nn

ATTENTION_ROLES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_ROLES = ("gate_proj", "up_proj", "down_proj")
NORM_ROLES = ("input_layernorm", "post_attention_layernorm")

# The order in which a block's Linears see data, in groups that share one input
# (GPTQ's "true sequential" order; AWQ's and SmoothQuant's scale-folding pairs).
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


class UnsupportedModelError(ValueError):
    """The model's structure is not one quantkern understands; the message names the module."""


@dataclass
class DecoderBlock:
    """One decoder block: its module, its qualified name in the model, and its parts by role."""

    index: int
    name: str
    module: nn.Module
    attention: nn.Module
    mlp: nn.Module
    linears: Dict[str, nn.Linear]  # role -> Linear, roles as in ATTENTION_ROLES + MLP_ROLES
    norms: Dict[str, nn.Module]  # role -> norm, roles as in NORM_ROLES
    linear_names: Dict[str, str] = field(default_factory=dict)  # role -> qualified name in the model

    def linear(self, role: str) -> nn.Linear:
        return self.linears[role]

    def replace_linear(self, role: str, module: nn.Module) -> None:
        parent = self.attention if role in ATTENTION_ROLES else self.mlp
        setattr(parent, role, module)
        self.linears[role] = module


@dataclass
class ModelStructure:
    """The parts of a decoder-only model that quantizers and rotations touch."""

    model: nn.Module
    base: nn.Module  # the module holding embeddings, blocks and final norm (``model.model``)
    blocks_name: str
    blocks: List[DecoderBlock]
    embed_tokens: nn.Embedding
    final_norm: nn.Module
    lm_head: Optional[nn.Linear]
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def tied_lm_head(self) -> bool:
        return self.lm_head is not None and self.lm_head.weight is self.embed_tokens.weight

    def non_block_modules(self) -> List[nn.Module]:
        """Children of ``base`` other than the blocks (embeddings, rotary embedding, final norm)."""
        blocks = self.base.get_submodule(self.blocks_name.split(".")[-1])
        return [child for child in self.base.children() if child is not blocks]


def _is_norm(module: nn.Module, hidden_size: int) -> bool:
    weight = getattr(module, "weight", None)
    return (weight is not None and weight.dim() == 1 and weight.shape[0] == hidden_size
            and not any(isinstance(m, nn.Linear) for m in module.modules()))


def _find_blocks(model: nn.Module):
    """The ModuleList whose entries hold Linears (the decoder blocks), and its qualified name."""
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(
                any(isinstance(m, nn.Linear) for m in block.modules()) for block in module):
            candidates.append((name, module))
    if not candidates:
        raise UnsupportedModelError(f"{type(model).__name__}: found no nn.ModuleList of decoder blocks holding Linears")
    if len(candidates) > 1:
        names = ", ".join(name for name, _ in candidates)
        raise UnsupportedModelError(f"{type(model).__name__}: more than one list of blocks ({names}); "
                                    "quantkern handles decoder-only models with one")
    return candidates[0]


def _child_with(block: nn.Module, block_name: str, roles) -> tuple:
    for child_name, child in block.named_children():
        if all(isinstance(getattr(child, role, None), nn.Linear) for role in roles):
            return child_name, child
    raise UnsupportedModelError(f"{block_name}: no child module with Linears {', '.join(roles)}")


def model_structure(model: nn.Module) -> ModelStructure:
    """Find the blocks and their parts; raise ``UnsupportedModelError`` naming what is not understood."""
    blocks_name, block_list = _find_blocks(model)
    base_name = blocks_name.rpartition(".")[0]
    base = model.get_submodule(base_name) if base_name else model
    config = getattr(model, "config", None)
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embed, nn.Embedding):
        raise UnsupportedModelError(f"{type(model).__name__}: input embeddings are not an nn.Embedding")
    hidden = embed.embedding_dim
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None

    blocks = []
    for index, block in enumerate(block_list):
        name = f"{blocks_name}.{index}"
        attn_name, attention = _child_with(block, name, ATTENTION_ROLES)
        mlp_name, mlp = _child_with(block, name, MLP_ROLES)
        linears = {role: getattr(attention, role) for role in ATTENTION_ROLES}
        linears.update({role: getattr(mlp, role) for role in MLP_ROLES})
        linear_names = {role: f"{name}.{attn_name if role in ATTENTION_ROLES else mlp_name}.{role}"
                        for role in linears}
        known = {id(m) for m in linears.values()}
        for sub_name, sub in block.named_modules():
            if isinstance(sub, nn.Linear) and id(sub) not in known:
                raise UnsupportedModelError(f"{name}.{sub_name}: a Linear with no known role "
                                            f"(known: {', '.join(ATTENTION_ROLES + MLP_ROLES)})")
        norms = {}
        for role in NORM_ROLES:
            norm = getattr(block, role, None)
            if norm is None or not _is_norm(norm, hidden):
                raise UnsupportedModelError(f"{name}.{role}: missing, or not a norm over the hidden size {hidden}")
            norms[role] = norm
        known_norms = {id(norm) for norm in norms.values()}
        for sub_name, sub in block.named_modules():
            if sub_name and id(sub) not in known_norms and _is_norm(sub, hidden):
                # Gemma2/Gemma3's sandwich norms: post_attention_layernorm then normalises the attention's
                # output and another norm feeds the MLP, so the roles above would be wrong.
                raise UnsupportedModelError(f"{name}.{sub_name}: a norm over the hidden size with no known role "
                                            f"(known: {', '.join(NORM_ROLES)}, the pre-norms of attention and "
                                            f"MLP); post- or sandwich norms are not supported")
        for role in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
            if linears[role].in_features != hidden:
                raise UnsupportedModelError(f"{linear_names[role]}: in_features {linears[role].in_features} "
                                            f"is not the hidden size {hidden}")
        for role in ("o_proj", "down_proj"):
            if linears[role].out_features != hidden:
                raise UnsupportedModelError(f"{linear_names[role]}: out_features {linears[role].out_features} "
                                            f"is not the hidden size {hidden}")
        blocks.append(DecoderBlock(index, name, block, attention, mlp, linears, norms, linear_names))

    final_norm = None
    for child_name, child in base.named_children():
        if child is not block_list and _is_norm(child, hidden):
            if final_norm is not None:
                raise UnsupportedModelError(f"{base_name or type(model).__name__}: more than one final norm")
            final_norm = child
    if final_norm is None:
        raise UnsupportedModelError(f"{base_name or type(model).__name__}: no final norm over the hidden size")

    num_heads = getattr(config, "num_attention_heads", None)
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or (hidden // num_heads if num_heads else None)
    if not num_heads or not head_dim:
        raise UnsupportedModelError(f"{type(model).__name__}: config has no num_attention_heads")
    return ModelStructure(model, base, blocks_name, blocks, embed, final_norm,
                          lm_head if isinstance(lm_head, nn.Linear) else None,
                          hidden, num_heads, num_kv_heads, head_dim)
