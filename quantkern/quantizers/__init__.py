"""Weight quantizers that produce the canonical format (``quantkern.format.QuantizedWeight``).

``quantize_model(model, tokenizer, QuantizeConfig(method=...))`` runs any of ``METHODS`` block by
block (see ``base``); each method lives in its own module.
"""

from .base import BlockRunner, QuantizeConfig, QuantizeResult, Quantizer, quantize_model
from .awq import AWQQuantizer
from .gptq import GPTQQuantizer
from .quarot import QuaRotQuantizer
from .rtn import RTNQuantizer
from .smoothquant import SmoothQuantQuantizer

METHODS = {
    "rtn": RTNQuantizer,
    "gptq": GPTQQuantizer,
    "quarot": QuaRotQuantizer,
    "smoothquant": SmoothQuantQuantizer,
    "awq": AWQQuantizer,
}

__all__ = ["METHODS", "BlockRunner", "QuantizeConfig", "QuantizeResult", "Quantizer", "quantize_model"]
