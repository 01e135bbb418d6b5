"""Mixed-precision weight-only quantization of MoE experts (CAMERA-Q, MC's PMQ and baselines).

* :mod:`.quantizers` — RTN and GPTQ at 1–8 bits with per-row bit-widths;
* :mod:`.allocation`, :mod:`.methods` — who gets how many bits;
* :mod:`.packed` — ``QuantizedExperts``, bit-packed storage with an experts-interface forward;
* :mod:`.api` — :func:`quantize` and :class:`QuantReport`;
* :mod:`.export` — compressed-tensors-style export of uniformly quantized modules.
"""

from camera_pl.quant.allocation import LayerBits
from camera_pl.quant.api import LayerReport, QuantReport, allocate, quantize
from camera_pl.experts.quantized import QuantizedExperts
from camera_pl.quant.quantizers import QuantizedRows, gptq, rtn

__all__ = ["LayerBits", "LayerReport", "QuantReport", "QuantizedExperts", "QuantizedRows", "allocate", "gptq",
           "quantize", "rtn"]
