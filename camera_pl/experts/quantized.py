"""``QuantizedExperts``: bit-packed mixed-precision storage for a layer's routed experts.

The experts may be fused (equal widths) or ragged (pruned first: expert ``e`` keeps
``widths[e]`` micro-experts, whose original indices are stored). Each expert has up to three weight matrices, each stored as quantized *rows* (see
:mod:`camera_pl.quant.quantizers`): gate ``[I, H]`` and up ``[I, H]`` rows, and the down
projection either as rows of ``down.T [I, H]`` (``down_axis="in"``: one row per
micro-expert column, so a micro-expert's gate row, up row and down column share one
bit-width) or as rows of ``down [H, I]`` (``down_axis="out"``: per output channel).

Rows of equal bit-width are kept together, per matrix and bit-width, in expert order:

* ``{m}_bits``   uint8 ``[ΣR_e]``: bit-width of every row, expert after expert (the allocation map);
* ``{m}_q{b}``   uint8 ``[N_b, ceil(C·b/8)]``: codes of the ``N_b`` rows at ``b`` bits, bit-packed;
* ``{m}_s{b}``   uint8 ``[N_b, 2G]``: float16 scales, stored as their bytes so that
  ``model.to(dtype)`` never re-rounds them;
* ``{m}_z{b}``   uint8 ``[N_b, G]``: zero points (absent for 1-bit rows: sign × scale).

The rows of expert ``e`` at ``b`` bits are a contiguous slice, whose start is precomputed
once from ``{m}_bits``. The forward (camera_pl's experts forward) dequantizes each hit
expert on the fly into the activations' dtype and runs exactly the experts' own math, so
it matches the model with the dequantized weights written back (fake quantization). The
packed module is for inference: codes are buffers, only biases stay trainable.
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.experts.base import Experts, ExpertWeights, cast
from camera_pl.experts.module import CameraExperts
from camera_pl.quant.quantizers import SCALE_DTYPE, QuantizedRows, dequantize


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack uint8 codes ``[N, C]`` (each < 2^bits) into uint8 ``[N, ceil(C·bits/8)]``, LSB first."""
    n, length = codes.shape
    planes = torch.stack([(codes >> k) & 1 for k in range(bits)], dim=-1).reshape(n, length * bits)
    planes = nn.functional.pad(planes, (0, (-planes.shape[1]) % 8)).reshape(n, -1, 8)
    out = torch.zeros(planes.shape[:2], dtype=torch.uint8, device=codes.device)
    for k in range(8):
        out |= planes[..., k] << k
    return out


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes ``[N, length]``."""
    n = packed.shape[0]
    planes = torch.stack([(packed >> k) & 1 for k in range(8)], dim=-1).reshape(n, -1)[:, : length * bits]
    planes = planes.reshape(n, length, bits)
    out = torch.zeros(n, length, dtype=torch.uint8, device=packed.device)
    for k in range(bits):
        out |= planes[..., k] << k
    return out


class QuantizedExperts(CameraExperts):
    """Replacement for a layer's routed experts, holding bit-packed mixed-precision weights.

    Build one with :meth:`from_rows`; ``QuantizedExperts(replaced, spec)`` makes an empty
    module of the right shapes (used by :func:`camera_pl.serialization.load`).
    """

    kind = "quantized"

    def __init__(self, replaced: Experts, spec: dict):
        super().__init__(replaced, len(spec["widths"]))
        self._spec = spec
        self._widths = torch.tensor(spec["widths"], dtype=torch.long)
        self._offsets = [0] + torch.cumsum(self._widths, 0).tolist()
        self._starts: dict[str, dict[int, list[int]]] | None = None
        device, total, hidden = replaced.device, int(self._widths.sum()), self.hidden_size
        if self.layout.has_bias:
            kw = dict(dtype=replaced.dtype, device=device)
            self.up_bias = nn.Parameter(torch.zeros(total, **kw))
            self.gate_bias = nn.Parameter(torch.zeros(total, **kw)) if self.layout.has_gate else None
            self.down_bias = nn.Parameter(torch.zeros(self.num_experts, hidden, **kw))
        if not spec.get("full_width", True):
            self.register_buffer("channel_index", torch.zeros(total, dtype=torch.long, device=device))
        for m, info in spec["matrices"].items():
            length, groups = info["length"], -(-info["length"] // info["group_size"])
            self.register_buffer(f"{m}_bits", torch.zeros(sum(self.rows_per_expert(m)), dtype=torch.uint8, device=device))
            for b, n in info["counts"].items():
                b = int(b)
                self.register_buffer(f"{m}_q{b}", torch.zeros(n, -(-length * b // 8), dtype=torch.uint8, device=device))
                self.register_buffer(f"{m}_s{b}", torch.zeros(n, 2 * groups, dtype=torch.uint8, device=device))
                if b > 1:
                    self.register_buffer(f"{m}_z{b}", torch.zeros(n, groups, dtype=torch.uint8, device=device))

    def rows_per_expert(self, m: str) -> list[int]:
        """Quantized rows of matrix ``m`` per expert."""
        if m == "down" and self._spec["down_axis"] == "out":
            return [self.hidden_size] * self.num_experts
        return self._widths.tolist()

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_rows(cls, replaced: Experts, matrices: dict[str, list[QuantizedRows]],
                  down_axis: str) -> "QuantizedExperts":
        """Pack per-expert quantized matrices (``{"gate"?, "up", "down": [QuantizedRows per expert]}``).

        Gate/up rows are rows of ``[W_e, H]``; down rows are rows of ``down.T`` (``down_axis="in"``)
        or of ``down`` (``down_axis="out"``, experts of equal width only). The micro-experts kept
        are ``replaced``'s.
        """
        if down_axis not in ("in", "out"):
            raise ValueError(f"down_axis must be 'in' (micro-expert columns) or 'out' (output rows), got {down_axis!r}.")
        widths = replaced.widths()
        if down_axis == "out" and not bool((widths == widths[0]).all()):
            raise ValueError("down_axis='out' quantizes rows of the down projection, whose length differs between "
                             "experts of unequal width (after layer/global pruning); use down_axis='in'.")
        spec = {"widths": widths.tolist(), "full_width": replaced.full_width, "down_axis": down_axis, "matrices": {}}
        for m, per_expert in matrices.items():
            bits = torch.cat([q.bits for q in per_expert])
            spec["matrices"][m] = {
                "length": per_expert[0].codes.shape[1], "group_size": per_expert[0].group_size,
                "counts": {str(b): int((bits == b).sum()) for b in sorted(set(bits.tolist()))},
            }
        module = cls(replaced, spec)
        with torch.no_grad():
            if not replaced.full_width:
                module.channel_index.copy_(torch.cat([replaced.channels(e) for e in range(replaced.num_experts)]))
            if module.layout.has_bias:
                per = [replaced.weights(e) for e in range(replaced.num_experts)]
                module.up_bias.copy_(torch.cat([w.up_bias for w in per]))
                module.down_bias.copy_(torch.stack([w.down_bias for w in per]))
                if module.gate_bias is not None:
                    module.gate_bias.copy_(torch.cat([w.gate_bias for w in per]))
            for m, per_expert in matrices.items():
                rows = [q for q in per_expert]
                bits = torch.cat([q.bits for q in rows])
                getattr(module, f"{m}_bits").copy_(bits)
                codes, scale, zero = (torch.cat([getattr(q, n) for q in rows]) for n in ("codes", "scale", "zero"))
                for b in spec["matrices"][m]["counts"]:
                    b = int(b)
                    here = bits == b
                    getattr(module, f"{m}_q{b}").copy_(pack_codes(codes[here], b))
                    getattr(module, f"{m}_s{b}").copy_(scale[here].to(SCALE_DTYPE).view(torch.uint8))
                    if b > 1:
                        getattr(module, f"{m}_z{b}").copy_(zero[here])
        return module

    def spec(self) -> dict:
        return self._spec

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._starts = None  # the bit maps change: recompute the row starts on next use
        super()._load_from_state_dict(*args, **kwargs)

    # ---- the experts interface -------------------------------------------------------------
    def widths(self) -> torch.Tensor:
        return self._widths.clone()

    def channels(self, e: int) -> torch.Tensor:
        if "channel_index" in self._buffers:
            return self.channel_index[self._offsets[e]:self._offsets[e + 1]]
        return torch.arange(self.intermediate_size, device=self.device)

    @property
    def device(self) -> torch.device:
        return next(iter(self._buffers.values())).device

    @property
    def dtype(self) -> torch.dtype:
        bias = self._parameters.get("up_bias")
        return bias.dtype if bias is not None else torch.float32

    def _row_starts(self) -> dict[str, dict[int, list[int]]]:
        """Per matrix and bit-width, the first row of each expert in that bit-width's store (one host sync)."""
        if self._starts is None:
            self._starts = {}
            for m in self._spec["matrices"]:
                bit_map = getattr(self, f"{m}_bits").cpu()
                ends = torch.tensor([0] + self.rows_per_expert(m)).cumsum(0)
                self._starts[m] = {}
                for b in self._spec["matrices"][m]["counts"]:
                    seen = torch.cat([torch.zeros(1, dtype=torch.long), (bit_map == int(b)).long().cumsum(0)])
                    self._starts[m][int(b)] = seen[ends].tolist()
        return self._starts

    def _matrix(self, m: str, e: int) -> torch.Tensor:
        """Float32 rows ``[R_e, C]`` of matrix ``m`` of expert ``e``."""
        info = self._spec["matrices"][m]
        first = sum(self.rows_per_expert(m)[:e])
        bit_map = getattr(self, f"{m}_bits")[first:first + self.rows_per_expert(m)[e]]
        out = torch.empty(bit_map.shape[0], info["length"], device=bit_map.device)
        for b, starts in self._row_starts()[m].items():
            start, stop = starts[e], starts[e + 1]
            if stop == start:
                continue
            codes = unpack_codes(getattr(self, f"{m}_q{b}")[start:stop], b, info["length"])
            scale = getattr(self, f"{m}_s{b}")[start:stop].view(SCALE_DTYPE)
            zero = getattr(self, f"{m}_z{b}")[start:stop] if b > 1 else torch.zeros_like(scale, dtype=torch.uint8)
            bits = torch.full((stop - start,), b, device=codes.device)
            out[bit_map == b] = dequantize(codes, scale, zero, bits, info["group_size"])
        return out

    def weights(self, e: int, dtype: torch.dtype | None = None) -> ExpertWeights:
        """Dequantized weights of expert ``e`` (float32 unless ``dtype``)."""
        down = self._matrix("down", e)
        down = down.t() if self._spec["down_axis"] == "in" else down
        gate = self._matrix("gate", e) if "gate" in self._spec["matrices"] else None
        w = ExpertWeights(gate, self._matrix("up", e), down)
        if self.layout.has_bias:
            s = slice(self._offsets[e], self._offsets[e + 1])
            w.gate_bias = None if self.gate_bias is None else self.gate_bias[s]
            w.up_bias, w.down_bias = self.up_bias[s], self.down_bias[e]
        return w if dtype is None else cast(w, dtype)

    def memory(self) -> dict[str, float]:
        """Expert-weight storage: bytes of codes + scales + zeros + bit maps (+ channel index), and bits per weight."""
        weight_bytes = sum(b.numel() * b.element_size() for b in self.buffers())
        params = sum(sum(self.rows_per_expert(m)) * info["length"] for m, info in self._spec["matrices"].items())
        bias_bytes = sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))
        return {"weight_bytes": weight_bytes, "params": params, "bits_per_param": 8 * weight_bytes / params,
                "bias_bytes": bias_bytes}

    def extra_repr(self) -> str:
        mem = self.memory()
        return (f"num_experts={self.num_experts}, down_axis={self._spec['down_axis']}, "
                f"bits/param={mem['bits_per_param']:.3f}")


def build_quantized(spec: dict, replaced: Experts) -> QuantizedExperts:
    """Empty :class:`QuantizedExperts` of the recorded shapes (codes come from the state dict)."""
    return QuantizedExperts(replaced, spec)
