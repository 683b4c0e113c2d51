"""Round to nearest (RTN): every weight group on its own min/max or absmax grid, no calibration."""

from __future__ import annotations

from typing import Dict, Optional

from ..format import QuantizedWeight
from ..models import DecoderBlock
from .base import ALL_ROLES, BlockRunner, Quantizer, set_fake_quantized


class RTNQuantizer(Quantizer):
    name = "rtn"
    needs_calibration = False

    def quantize_block(self, block: DecoderBlock, runner: Optional[BlockRunner]) -> Dict[str, QuantizedWeight]:
        quantized = {}
        for role in ALL_ROLES:
            quantized[role] = self.rtn(block.linears[role].weight)
            set_fake_quantized(block.linears[role], quantized[role])
        return quantized
