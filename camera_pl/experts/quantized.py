"""``QuantizedExperts``: bit-packed mixed-precision storage for a layer's fused routed experts.

Each expert has up to three weight matrices, each stored as quantized *rows* (see
:mod:`camera_pl.quant.quantizers`): gate ``[I, H]`` and up ``[I, H]`` rows, and the down
projection either as rows of ``down.T [I, H]`` (``down_axis="in"``: one row per
micro-expert column, so a micro-expert's gate row, up row and down column share one
bit-width) or as rows of ``down [H, I]`` (``down_axis="out"``: per output channel).

Rows of equal bit-width are kept together, per matrix and bit-width, in expert order:

* ``{m}_bits``   uint8 ``[E, R]``: bit-width of every row (the allocation map);
* ``{m}_q{b}``   uint8 ``[N_b, ceil(C·b/8)]``: codes of the ``N_b`` rows at ``b`` bits, bit-packed;
* ``{m}_s{b}``   int16 ``[N_b, G]``: float16 scales, stored as their bit pattern so that
  ``model.to(dtype)`` never re-rounds them;
* ``{m}_z{b}``   uint8 ``[N_b, G]``: zero points (absent for 1-bit rows: sign × scale).

The rows of expert ``e`` at ``b`` bits are a contiguous slice, found from ``{m}_bits``.
The forward dequantizes each hit expert on the fly into the activations' dtype and runs
exactly the experts' own math (``_apply_gate``, ``act_fn``, biases, post-expert norm), so
it matches the fused model with the dequantized weights written back (fake quantization).
The packed module is for inference: codes are buffers, only biases stay trainable.
"""

from __future__ import annotations

import torch
from torch import nn

from camera_pl.quant.quantizers import SCALE_DTYPE, QuantizedRows, dequantize
from camera_pl.serialization import register_experts_kind

KIND = "quantized"
_SCALARS = (bool, int, float, str)


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


def expert_act(experts: nn.Module, e: int, x: torch.Tensor, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
    """Micro-expert activations ``a_e(x) [T, I]`` of an experts module with explicit ``[I, H]`` weights.

    Works for transformers' fused experts and for :class:`QuantizedExperts` alike: the
    gate/up outputs are laid out as the module expects (concatenated or interleaved)
    before its own ``_apply_gate``; biases are the module's.
    """
    has_bias = getattr(experts, "has_bias", False)
    u = nn.functional.linear(x, up)
    if gate is None:
        return experts.act_fn(u + experts.up_proj_bias[e] if has_bias else u)
    g = nn.functional.linear(x, gate)
    if getattr(experts, "is_concatenated", True):
        proj = torch.cat([g, u], dim=-1)
    else:
        proj = torch.stack([g, u], dim=-1).flatten(-2)
    if has_bias:
        proj = proj + experts.gate_up_proj_bias[e]
    return experts._apply_gate(proj)


def expert_out(experts: nn.Module, e: int, a: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``f_e(x) [T, H]`` from activations and an explicit ``down [H, I]`` (bias, post-expert norm)."""
    out = nn.functional.linear(a, down)
    if getattr(experts, "has_bias", False):
        out = out + experts.down_proj_bias[e]
    if getattr(experts, "has_post_expert_norm", False):
        out = experts.post_expert_norm(out)
    return out


def run_expert(experts: nn.Module, e: int, x: torch.Tensor, gate: torch.Tensor | None, up: torch.Tensor,
               down: torch.Tensor) -> torch.Tensor:
    """``f_e(x) [T, H]`` of expert ``e`` computed with the given weights (routing weight not applied)."""
    return expert_out(experts, e, expert_act(experts, e, x, gate, up), down)


class QuantizedExperts(nn.Module):
    """Drop-in replacement for a fused experts module, holding bit-packed mixed-precision weights.

    Build one with :meth:`from_rows`; ``QuantizedExperts(original, spec)`` makes an empty
    module of the right shapes (used by :func:`camera_pl.serialization.load`).
    """

    kind = KIND

    def __init__(self, original: nn.Module, spec: dict):
        super().__init__()
        self._spec = spec
        for name, value in vars(original).items():  # flags and the constants _apply_gate reads
            if not name.startswith("_") and isinstance(value, _SCALARS):
                setattr(self, name, value)
        self.num_experts = int(spec["num_experts"])
        self.hidden_size = int(spec["hidden_size"])
        self.intermediate_size = int(spec["intermediate_size"])
        self._gate_fn = getattr(type(original), "_apply_gate", None)
        for name in ("act_fn", "post_expert_norm"):
            if isinstance(getattr(original, name, None), nn.Module):
                setattr(self, name, getattr(original, name))
        if getattr(self, "has_bias", False):
            for name in ("gate_up_proj_bias" if self.has_gate else "up_proj_bias", "down_proj_bias"):
                setattr(self, name, nn.Parameter(getattr(original, name).detach().clone()))
        for m, info in spec["matrices"].items():
            rows, length, groups = info["rows"], info["length"], -(-info["length"] // info["group_size"])
            self.register_buffer(f"{m}_bits", torch.zeros(self.num_experts, rows, dtype=torch.uint8))
            for b, n in info["counts"].items():
                b = int(b)
                self.register_buffer(f"{m}_q{b}", torch.zeros(n, -(-length * b // 8), dtype=torch.uint8))
                self.register_buffer(f"{m}_s{b}", torch.zeros(n, groups, dtype=torch.int16))
                if b > 1:
                    self.register_buffer(f"{m}_z{b}", torch.zeros(n, groups, dtype=torch.uint8))

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_rows(cls, original: nn.Module, matrices: dict[str, list[QuantizedRows]],
                  down_axis: str) -> "QuantizedExperts":
        """Pack per-expert quantized matrices (``{"gate"?, "up", "down": [QuantizedRows per expert]}``).

        Gate/up rows are rows of ``[I, H]``; down rows are rows of ``down.T`` (``down_axis="in"``)
        or of ``down`` (``down_axis="out"``).
        """
        if down_axis not in ("in", "out"):
            raise ValueError(f"down_axis must be 'in' (micro-expert columns) or 'out' (output rows), got {down_axis!r}.")
        up = matrices["up"][0]
        spec = {"num_experts": len(matrices["up"]), "hidden_size": up.codes.shape[1],
                "intermediate_size": up.codes.shape[0], "down_axis": down_axis, "matrices": {}}
        for m, per_expert in matrices.items():
            bits = torch.stack([q.bits for q in per_expert])
            spec["matrices"][m] = {
                "rows": per_expert[0].codes.shape[0], "length": per_expert[0].codes.shape[1],
                "group_size": per_expert[0].group_size,
                "counts": {str(b): int((bits == b).sum()) for b in sorted(set(bits.flatten().tolist()))},
            }
        module = cls(original, spec)
        with torch.no_grad():
            for m, per_expert in matrices.items():
                getattr(module, f"{m}_bits").copy_(torch.stack([q.bits for q in per_expert]))
                for b in spec["matrices"][m]["counts"]:
                    b = int(b)
                    sel = [(q, q.bits == b) for q in per_expert]
                    codes = torch.cat([q.codes[k] for q, k in sel])
                    getattr(module, f"{m}_q{b}").copy_(pack_codes(codes, b))
                    scale = torch.cat([q.scale[k] for q, k in sel]).to(SCALE_DTYPE)
                    getattr(module, f"{m}_s{b}").copy_(scale.view(torch.int16))
                    if b > 1:
                        getattr(module, f"{m}_z{b}").copy_(torch.cat([q.zero[k] for q, k in sel]))
        return module.to(up.codes.device)

    def spec(self) -> dict:
        """JSON-able description from which :class:`QuantizedExperts` rebuilds an empty module."""
        return self._spec

    # ---- weights ---------------------------------------------------------------------------
    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._gate_fn(self, gate_up)

    def _matrix(self, m: str, e: int) -> torch.Tensor:
        """Float32 rows ``[R, C]`` of matrix ``m`` of expert ``e``."""
        info = self._spec["matrices"][m]
        bit_map = getattr(self, f"{m}_bits")
        out = torch.empty(info["rows"], info["length"], device=bit_map.device)
        for b in info["counts"]:
            b = int(b)
            here = bit_map[e] == b
            n = int(here.sum())
            if n == 0:
                continue
            start = int((bit_map[:e] == b).sum())
            codes = unpack_codes(getattr(self, f"{m}_q{b}")[start:start + n], b, info["length"])
            scale = getattr(self, f"{m}_s{b}")[start:start + n].view(SCALE_DTYPE)
            zero = getattr(self, f"{m}_z{b}")[start:start + n] if b > 1 else torch.zeros_like(scale, dtype=torch.uint8)
            bits = torch.full((n,), b, device=codes.device)
            out[here] = dequantize(codes, scale, zero, bits, info["group_size"])
        return out

    def expert_weights(self, e: int, dtype: torch.dtype = torch.float32
                       ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Dequantized ``(gate [I, H] or None, up [I, H], down [H, I])`` of expert ``e`` in ``dtype``."""
        down = self._matrix("down", e)
        down = down.t() if self._spec["down_axis"] == "in" else down
        gate = self._matrix("gate", e).to(dtype) if "gate" in self._spec["matrices"] else None
        return gate, self._matrix("up", e).to(dtype), down.to(dtype)

    def memory(self) -> dict[str, float]:
        """Expert-weight storage: bytes of codes + scales + zeros + bit maps, and bits per weight."""
        weight_bytes = sum(b.numel() * b.element_size() for b in self.buffers())
        params = sum(info["rows"] * info["length"] for info in self._spec["matrices"].values()) * self.num_experts
        bias_bytes = sum(p.numel() * p.element_size() for p in self.parameters(recurse=False))
        return {"weight_bytes": weight_bytes, "params": params, "bits_per_param": 8 * weight_bytes / params,
                "bias_bytes": bias_bytes}

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """Experts-interface forward: ``hidden_states [T, H]``, routing ``[T, k]`` -> ``[T, H]``."""
        num_tokens, top_k = top_k_index.shape
        out_dtype = torch.promote_types(hidden_states.dtype, top_k_weights.dtype)
        slots = hidden_states.new_zeros(num_tokens, top_k, hidden_states.shape[-1], dtype=out_dtype)
        for e in torch.unique(top_k_index).tolist():
            if e >= self.num_experts:  # expert-parallel sentinel
                continue
            tok, slot = torch.where(top_k_index == e)
            gate, up, down = self.expert_weights(e, hidden_states.dtype)
            out = run_expert(self, e, hidden_states[tok], gate, up, down)
            slots[tok, slot] = out * top_k_weights[tok, slot, None]
        return slots.sum(dim=1).to(hidden_states.dtype)

    def extra_repr(self) -> str:
        mem = self.memory()
        return (f"num_experts={self.num_experts}, down_axis={self._spec['down_axis']}, "
                f"bits/param={mem['bits_per_param']:.3f}")


register_experts_kind(KIND, lambda spec, original: QuantizedExperts(original, spec))
