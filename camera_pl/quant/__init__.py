"""Mixed-precision weight-only quantization of MoE experts (CAMERA-Q, MC's PMQ and baselines).

* :mod:`.quantizers` — RTN and GPTQ at 1–8 bits with per-row bit-widths (pure tensor math);
* :mod:`.allocation`, :mod:`.methods` — who gets how many bits;
* :mod:`.api` — :func:`~camera_pl.quant.api.quantize` (also ``camera_pl.quantize``) and its report;
* :mod:`.fake` — a straight-through fake-quantized phase;
* :mod:`.export` — compressed-tensors-style export of uniformly quantized modules.

The packed storage lives with the other experts kinds, in :mod:`camera_pl.experts.quantized`.
"""
