"""Weight quantizers that produce the canonical format (``quantkern.format.QuantizedWeight``).

``quantize_model(model, tokenizer, QuantizeConfig(method=...))`` runs any of ``METHODS`` block by
block (see ``base``); each method lives in its own module.
"""

from .base import BlockRunner, QuantizeConfig, QuantizeResult, Quantizer, quantize_model
from .gptq import GPTQQuantizer
from .rtn import RTNQuantizer

METHODS = {
    "rtn": RTNQuantizer,
    "gptq": GPTQQuantizer,
}

__all__ = ["METHODS", "BlockRunner", "QuantizeConfig", "QuantizeResult", "Quantizer", "quantize_model"]
