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
once from ``{m}_bits``. Where grouped GEMMs run (CPU fp32/bf16, CUDA bf16; gated experts
without a post-expert norm), :meth:`QuantizedExperts.grouped_weights` dequantizes the experts
a forward hits (decoding: a few of them; the experts forward asks for them in batches of
bounded size) into compact zero-padded ``[n, width, H]`` stacks: per (matrix, bit-width),
the hit experts' rows are unpacked at once (a few whole-tensor ops), dequantized
in bounded float32 chunks and written, cast once, to precomputed rows of the stacks in the
activations' dtype; the experts forward then runs two grouped GEMMs over those experts.
On a CPU the stacks hold each expert's micro-experts ordered by bit-width (its gate row, up
row and down column move together, so only the GEMMs' summation order changes): every
(expert, bit-width) block is one run of rows, dequantized straight into place, with no
cast copy and no scatter (a Qwen3-30B-A3B-sized CAMERA-Q layer: 19% faster than scattering).
Otherwise :meth:`~QuantizedExperts.weights` dequantizes each hit expert to float32 and casts it.
Both give the float32 dequantized weights rounded once to the activations' dtype and run the
experts' own math, so the output matches the model with the dequantized weights written back
(fake quantization). The packed module is for inference: codes are buffers, only biases stay
trainable.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from camera_pl.experts import lowbit
from camera_pl.experts.base import Experts, ExpertWeights, GroupedWeights, cast, grouped_mm_supported
from camera_pl.experts.forward import SortedRouting, projected_rows
from camera_pl.experts.module import CameraExperts
from camera_pl.host_memory import release_freed_host_memory
from camera_pl.quant.quantizers import SCALE_DTYPE, QuantizedRows, effective_group_size


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack uint8 codes ``[N, C]`` (each < 2^bits) into uint8 ``[N, ceil(C·bits/8)]``, LSB first."""
    n, length = codes.shape
    if 8 % bits == 0:  # whole codes per byte: shift and add, no bit planes
        per = 8 // bits
        grouped = nn.functional.pad(codes, (0, (-length) % per)).view(n, -1, per)
        return (grouped << torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)).sum(-1, dtype=torch.uint8)
    planes = torch.stack([(codes >> k) & 1 for k in range(bits)], dim=-1).reshape(n, length * bits)
    planes = nn.functional.pad(planes, (0, (-planes.shape[1]) % 8)).reshape(n, -1, 8)
    out = torch.zeros(planes.shape[:2], dtype=torch.uint8, device=codes.device)
    for k in range(8):
        out |= planes[..., k] << k
    return out


def unpack_codes(packed: torch.Tensor, bits: int, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes ``[N, length]``."""
    return _codes(packed, bits, length).to(torch.uint8)


_WINDOW_BITS = {1: 8, 3: 12}  # packed bits read at once through a table, per code width (CPU)
_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _table(bits: int, device: torch.device) -> torch.Tensor:
    """Float32 ``[2^w, w / bits]``: the codes (LSB first) of every ``w``-bit window value (cached per device)."""
    if (bits, device) not in _TABLES:
        window = _WINDOW_BITS[bits]
        values = torch.arange(1 << window)[:, None] >> torch.arange(0, window, bits)
        _TABLES[bits, device] = (values & ((1 << bits) - 1)).float().to(device)
    return _TABLES[bits, device]


def _pad_columns(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """``t [N, C]`` zero-padded to a multiple of ``multiple`` columns (``t`` itself where it has one)."""
    return t if t.shape[1] % multiple == 0 else nn.functional.pad(t, (0, -t.shape[1] % multiple))


def _code_planes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Float32 codes ``[N, C·8/bits]`` of rows packed at 2 or 4 bits: one shift-and-mask over all bytes per
    code position in a byte, written (converted) straight into its strided place in the result."""
    n, per = packed.shape[0], 8 // bits
    codes = torch.empty(n, packed.shape[1], per, device=packed.device)
    for k in range(per):
        shifted = packed >> (k * bits) if k else packed
        codes[..., k] = shifted & ((1 << bits) - 1) if k < per - 1 else shifted
    return codes.view(n, -1)


def _codes(packed: torch.Tensor, bits: int, columns: int, cpu: bool | None = None) -> torch.Tensor:
    """Codes of bit-packed rows as float32 ``[N, columns]`` (exact integers); columns past the stored codes
    hold zeros or left-over bits, for callers that cut them off again (padding to whole quantization groups).

    8 bits: the bytes themselves. The ``cpu`` ways (default: on a CPU) are the fastest measured
    on one: 1 and 3 bits take one table lookup per 8- or 12-bit window of the packed bytes
    (already float), 2 and 4 bits one strided write per code position of a byte
    (:func:`_code_planes`; 2–3× faster than lookups of their 8- and 16-bit windows). Otherwise
    (GPUs, where a random-access gather took 83% of an H100 forward) widths dividing 8 shift
    codes out of whole bytes, and the others read every ``bits`` bytes as one word of 8 codes
    and shift.
    """
    n = packed.shape[0]
    cpu = packed.device.type == "cpu" if cpu is None else cpu
    if bits == 8:
        codes = packed.to(torch.float32)
    elif cpu and bits in _WINDOW_BITS:
        if bits == 3:  # 3 bytes = two 12-bit windows of 4 codes
            triples = _pad_columns(packed, 3).view(n, -1, 3).int()
            low = triples[..., 0] | ((triples[..., 1] & 15) << 8)
            window = torch.stack([low, (triples[..., 1] >> 4) | (triples[..., 2] << 4)], -1)
        else:  # byte windows of 8 codes
            window = packed.int()
        codes = _table(bits, packed.device).index_select(0, window.view(-1)).view(n, -1)
    elif cpu and 8 % bits == 0:
        codes = _code_planes(packed, bits)
    elif 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        codes = ((packed[..., None] >> shifts) & ((1 << bits) - 1)).view(n, -1).to(torch.float32)
    else:
        wide = torch.int64  # a word of 8 codes has 40–56 bits
        packed = _pad_columns(packed, bits)
        byte_shifts = torch.arange(0, 8 * bits, 8, dtype=wide, device=packed.device)
        words = (packed.view(n, -1, bits).to(wide) << byte_shifts).sum(-1)  # bytes never overlap
        code_shifts = torch.arange(0, 8 * bits, bits, dtype=wide, device=packed.device)
        codes = ((words[..., None] >> code_shifts) & ((1 << bits) - 1)).view(n, -1).to(torch.float32)
    return codes[:, :columns] if codes.shape[1] >= columns else nn.functional.pad(codes, (0, columns - codes.shape[1]))


def _index_copy_rows(out: torch.Tensor, dest: torch.Tensor, rows: torch.Tensor) -> None:
    """``out[dest] = rows`` for 2-byte rows moved as 4-byte words where their layout allows (CPU index_copy_
    of bf16 rows is ~1.8x slower than of the same bytes as int32)."""
    if (out.element_size() == 2 and out.shape[1] % 2 == 0
            and all(t.is_contiguous() and t.storage_offset() % 2 == 0 for t in (out, rows))):
        out, rows = out.view(torch.int32), rows.view(torch.int32)
    out.index_copy_(0, dest, rows)


def _dequantize_into(out: torch.Tensor, dest: torch.Tensor | int, packed: torch.Tensor, bits: int,
                     scale: torch.Tensor, zero: torch.Tensor | None, group_size: int) -> None:
    """Dequantize bit-packed rows into rows ``dest`` (indices, or the first of a run of rows) of ``out [R, C]``,
    in ``out``'s dtype.

    The same arithmetic as :func:`~camera_pl.quant.quantizers.dequantize` — ``(q − z)·s``, or
    ``(2q − 1)·s`` at 1 bit (``zero`` None) — in place on one float32 ``[N, G, g]`` block
    (per-group scales and zeros broadcast, no per-entry grids), cast once to ``out``'s dtype:
    bit-identical to fake quantization's weights (float32 dequantization cast to the weights' dtype).
    """
    n, length = packed.shape[0], out.shape[1]
    groups = scale.shape[1]
    w = _codes(packed, bits, groups * group_size).view(n, groups, group_size)
    w = w.mul_(2).sub_(1) if zero is None else w.sub_(zero.float()[..., None])
    w = w.mul_(scale.float()[..., None]).view(n, -1)[:, :length]
    if isinstance(dest, int):  # a run of rows: cast on the way in (no cast copy, no scatter)
        out[dest:dest + n].copy_(w)
    else:
        _index_copy_rows(out, dest, w.to(out.dtype))


_CHUNK = 1 << 24  # entries dequantized at once: bounds the temporaries of the grouped path


@dataclass
class _GroupedPlan:
    """Where the stored rows go in the zero-padded expert stacks (computed once per device).

    ``width``: common padded width (a multiple of 8); ``padded``: whether any expert is
    narrower (its stacks then start from zeros); ``channels [E, width]``: original
    micro-expert of each slot (``intermediate_size`` for padding) or None where the slots are the
    micro-experts (full, aligned width, stored order); ``slots [ΣW]``: padded position
    ``e·width + slot`` of every kept micro-expert (CPU plans order slots by bit-width);
    ``dest[m][b]``: padded row of each row stored at ``b`` bits for matrix ``m`` (gate and up
    rows: rows of the packed ``[E·2·width, H]`` gate/up stack, in the module's layout), on the
    device and (``host``) on the CPU; ``per[m]``: rows of one expert in ``m``'s stack;
    ``starts[m][b]``: int64 ``[E + 1]`` (CPU) first stored row of each expert at ``b`` bits;
    ``runs[m][b]``: first padded row of each expert's ``b``-bit rows where each expert's are one run
    (micro-experts ordered by bit-width, CPU plans), else None (scattered);
    ``stores``: the stores as the low-bit kernels read them (built on their first use).
    """

    width: int
    padded: bool
    channels: torch.Tensor | None
    slots: torch.Tensor
    dest: dict[str, dict[int, torch.Tensor]]
    host: dict[str, dict[int, torch.Tensor]]
    per: dict[str, int]
    starts: dict[str, dict[int, torch.Tensor]]
    runs: dict[str, dict[int, list[int] | None]]
    stores: dict[str, list[lowbit.Store]] | None = None


_RUN_ENTRIES = 1 << 20
"""Entries of a run of rows above which its own dequantization call costs less than the scatter it saves
(CPU: ~10% of the dequantization's time, against ~0.1 ms of fixed cost per call)."""


def _pays(runs: list[tuple[int, int, int]], chunk: int, columns: int) -> bool:
    """Whether writing ``runs`` (``(first, end, row)``) one call each beats scattering all their rows in chunks of
    ``chunk`` rows: as few calls, or runs long enough that each call pays for itself."""
    rows = sum(end - first for first, end, _ in runs)
    return len(runs) <= -(-rows // chunk) or rows * columns >= _RUN_ENTRIES * len(runs)


def _runs(dest: torch.Tensor, starts: torch.Tensor) -> list[int] | None:
    """First padded row of each expert's rows at one bit-width (``dest [N]`` split by ``starts [E + 1]``), where
    every expert's are one run of consecutive rows; else None."""
    step, inner = dest.diff() == 1, starts[1:-1]
    step[inner[(inner > 0) & (inner < dest.numel())] - 1] = True  # from one expert's rows to the next
    return dest[starts[:-1].clamp(max=dest.numel() - 1)].tolist() if bool(step.all()) else None


class QuantizedExperts(CameraExperts):
    """Replacement for a layer's routed experts, holding bit-packed mixed-precision weights.

    Build one with :meth:`for_bits`, then fill it with :meth:`write_rows` expert by expert;
    ``QuantizedExperts(replaced, spec)`` makes an empty module of the right shapes (used by
    :func:`camera_pl.serialization.load`).
    """

    kind = "quantized"
    grouped_subsets = True

    def __init__(self, replaced: Experts, spec: dict):
        super().__init__(replaced, len(spec["widths"]))
        self._spec = spec
        self._widths = torch.tensor(spec["widths"], dtype=torch.long)
        self._offsets = [0] + torch.cumsum(self._widths, 0).tolist()
        self._starts: dict[str, dict[int, list[int]]] | None = None
        self._plans: dict[torch.device, _GroupedPlan] = {}
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
    def for_bits(cls, replaced: Experts, row_bits: dict[str, torch.Tensor], group_size: int,
                 down_axis: str) -> "QuantizedExperts":
        """An unfilled module for the allocation ``row_bits`` (``{m: bits of every stored row, expert after
        expert}``): bit maps, biases and kept channels set, codes zero until :meth:`write_rows` fills
        them expert by expert, so that a layer is packed while it is quantized and its unpacked codes
        never exist all at once.

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
        lengths = {"gate": replaced.hidden_size, "up": replaced.hidden_size,
                   "down": replaced.hidden_size if down_axis == "in" else int(widths[0])}
        for m, bits in row_bits.items():
            spec["matrices"][m] = {"length": lengths[m], "group_size": effective_group_size(group_size, lengths[m]),
                                   "counts": {str(b): int((bits == b).sum()) for b in sorted(set(bits.tolist()))}}
        module = cls(replaced, spec)
        with torch.no_grad():
            for m, bits in row_bits.items():
                getattr(module, f"{m}_bits").copy_(bits)
            if not replaced.full_width:
                module.channel_index.copy_(torch.cat([replaced.channels(e) for e in range(replaced.num_experts)]))
            if module.layout.has_bias:
                per = [replaced.weights(e) for e in range(replaced.num_experts)]
                module.up_bias.copy_(torch.cat([w.up_bias for w in per]))
                module.down_bias.copy_(torch.stack([w.down_bias for w in per]))
                if module.gate_bias is not None:
                    module.gate_bias.copy_(torch.cat([w.gate_bias for w in per]))
        return module

    def write_rows(self, m: str, e: int, q: QuantizedRows) -> None:
        """Pack expert ``e``'s quantized rows of matrix ``m`` into their places in the stores (bit-widths as
        allocated by :meth:`for_bits`); the temporaries stay one expert's size."""
        info = self._spec["matrices"][m]
        allocated = self._bit_map(m, e)
        if q.codes.shape[1] != info["length"] or q.group_size != info["group_size"] or \
                not torch.equal(q.bits.to(allocated), allocated):
            raise ValueError(f"expert {e}'s {m} rows ({tuple(q.codes.shape)}, group size {q.group_size}) do not match "
                             f"the allocation this module was built for ({allocated.numel()} rows of "
                             f"{info['length']}, group size {info['group_size']}, the allocated bit-widths).")
        bits = q.bits.cpu()
        with torch.no_grad():
            for b, starts in self._row_starts()[m].items():
                rows = (bits == b).nonzero().squeeze(1)
                if not rows.numel():
                    continue
                stored = slice(starts[e], starts[e + 1])
                rows = rows.to(q.codes.device)
                getattr(self, f"{m}_q{b}")[stored] = pack_codes(q.codes.index_select(0, rows), b)
                getattr(self, f"{m}_s{b}")[stored] = q.scale.index_select(0, rows).to(SCALE_DTYPE).view(torch.uint8)
                if b > 1:
                    getattr(self, f"{m}_z{b}")[stored] = q.zero.index_select(0, rows)
        release_freed_host_memory()

    def spec(self) -> dict:
        return self._spec

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._starts = None  # the bit maps change: recompute the row starts and plans on next use
        self._plans = {}
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._plans = {}  # the plans' stores hold the buffers that a move (.to, .cuda) replaces
        return super()._apply(fn, *args, **kwargs)

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

    def _bit_map(self, m: str, e: int) -> torch.Tensor:
        """Bit-widths of expert ``e``'s stored rows of matrix ``m`` (a view of ``{m}_bits``)."""
        rows = self.rows_per_expert(m)
        first = sum(rows[:e])
        return getattr(self, f"{m}_bits")[first:first + rows[e]]

    def _matrix(self, m: str, e: int) -> torch.Tensor:
        """Float32 rows ``[R_e, C]`` of matrix ``m`` of expert ``e``."""
        bit_map = self._bit_map(m, e)
        out = torch.empty(bit_map.shape[0], self._spec["matrices"][m]["length"], device=bit_map.device)
        for b, starts in self._row_starts()[m].items():
            if starts[e + 1] > starts[e]:
                self._dequantize_rows(m, b, slice(starts[e], starts[e + 1]), out, (bit_map == b).nonzero().squeeze(1))
        return out

    def _dequantize_rows(self, m: str, b: int, rows: slice | torch.Tensor, out: torch.Tensor,
                         dest: torch.Tensor | int) -> None:
        """Rows ``rows`` (a slice or int64 indices) of matrix ``m``'s ``b``-bit store into rows ``dest`` (indices,
        or the first of a run) of ``out``."""
        def take(t: torch.Tensor) -> torch.Tensor:
            return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)

        scale = take(getattr(self, f"{m}_s{b}")).view(SCALE_DTYPE)
        zero = take(getattr(self, f"{m}_z{b}")) if b > 1 else None
        _dequantize_into(out, dest, take(getattr(self, f"{m}_q{b}")), b, scale, zero,
                         self._spec["matrices"][m]["group_size"])

    def _plan(self, device: torch.device) -> _GroupedPlan:
        """The cached :class:`_GroupedPlan` on ``device`` (one host sync, on first use)."""
        if device not in self._plans:
            num, widths, hidden = self.num_experts, self._widths, self.hidden_size
            width = max(8, -(-int(widths.max()) // 8) * 8)
            expert = torch.repeat_interleave(torch.arange(num), widths)
            index = torch.arange(expert.numel()) - torch.tensor(self._offsets[:-1])[expert]
            slot = self._slots_by_bits(expert, index) if device.type == "cpu" else index
            slots = expert * width + slot
            channels = None
            if not (self.full_width and width == self.intermediate_size and slot is index):
                channels = torch.full((num * width,), self.intermediate_size, dtype=torch.long)
                kept = self.channel_index.cpu() if "channel_index" in self._buffers else index
                channels = channels.index_put((slots,), kept).view(num, width)
            ids = torch.arange(2 * num * width).view(2, num, width)  # gate and up rows of the packed [E·2·width]
            order = self.layout.pack(ids[0], ids[1], 1).flatten()
            position = torch.empty_like(order).index_put_((order,), torch.arange(order.numel()))
            padded_rows = {"gate": position[slots], "up": position[num * width + slots], "down": slots}
            by_output = self._spec["down_axis"] == "out"  # down rows [E·H, W]: no padding
            per = {"gate": 2 * width, "up": 2 * width, "down": hidden if by_output else width}
            host = {}
            for m in self._spec["matrices"]:
                bit_map = getattr(self, f"{m}_bits").cpu()
                padded = torch.arange(bit_map.numel()) if m == "down" and by_output else padded_rows[m]
                host[m] = {int(b): padded[bit_map == int(b)] for b in self._spec["matrices"][m]["counts"]}
            starts = {m: {b: torch.tensor(s) for b, s in by_bits.items()} for m, by_bits in self._row_starts().items()}
            runs = {m: {b: _runs(d, starts[m][b]) if device.type == "cpu" else None for b, d in by_bits.items()}
                    for m, by_bits in host.items()}  # on a GPU, a launch per run would cost more than the scatter
            self._plans[device] = _GroupedPlan(
                width, bool((widths < width).any()), None if channels is None else channels.to(device),
                slots.to(device), {m: {b: d.to(device) for b, d in by_bits.items()} for m, by_bits in host.items()},
                host, per, starts, runs)
        return self._plans[device]

    def _slots_by_bits(self, expert: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Slot of every kept micro-expert in its expert's stacked rows, ordered by the gate rows' bit-width (then
        by index): each (expert, bit-width) block of rows is then one run of the stacks, dequantized
        straight into place. A micro-expert's gate and up rows and down column share its slot, so
        only the GEMM's summation order changes. ``index`` itself where the order would not change,
        or where the down projection is stored by output rows (whose columns keep the stored order)."""
        if self._spec["down_axis"] != "in":
            return index
        bits = getattr(self, "gate_bits" if "gate" in self._spec["matrices"] else "up_bits").cpu().long()
        order = torch.argsort(expert * 256 + bits, stable=True)  # by expert, then bit-width, then index
        slot = torch.empty_like(index).index_put_((order,), index)
        return index if torch.equal(slot, index) else slot

    def _stack(self, m: str, plan: _GroupedPlan, hit: list[int] | None, out: torch.Tensor) -> torch.Tensor:
        """Rows of matrix ``m`` of the experts ``hit`` (ascending; None: all) dequantized into their padded rows
        of the stack ``out [n·per, C]`` of those experts: one unpack per bit-width (in bounded chunks) serves
        every expert — per run of rows where the plan has runs (CPU). The rows to read and where they go
        come from the host-side plan: no device sync; a run of consecutive experts reads one slice of
        each store."""
        chunk = max(1, _CHUNK // out.shape[1])
        first, stop = (0, self.num_experts) if hit is None else (hit[0], hit[-1] + 1)
        consecutive = stop - first == (self.num_experts if hit is None else len(hit))
        for b, dest in plan.dest[m].items():
            runs = self._runs_of(m, b, plan, hit) if plan.runs[m][b] is not None else None
            if runs and _pays(runs, chunk, out.shape[1]):  # dequantized straight into place
                for begin, end, row in runs:
                    for start in range(begin, end, chunk):
                        self._dequantize_rows(m, b, slice(start, min(start + chunk, end)), out, row + start - begin)
                continue
            if consecutive:
                starts = self._row_starts()[m][b]
                rows, dest = starts[first], dest[starts[first]:starts[stop]]
                dest = dest - first * plan.per[m] if first else dest
            else:  # stored rows of the hit experts, and their rows in the compact stack
                chosen, starts = torch.tensor(hit), plan.starts[m][b]
                begin, count = starts[chosen], starts[chosen + 1] - starts[chosen]
                total = int(count.sum())
                rows = torch.arange(total) + torch.repeat_interleave(begin - (count.cumsum(0) - count), count,
                                                                     output_size=total)
                moved = torch.repeat_interleave((chosen - torch.arange(len(hit))) * plan.per[m], count,
                                                output_size=total)
                rows, dest = torch.stack([rows, plan.host[m][b][rows] - moved]).to(out.device, non_blocking=True)
            for start in range(0, dest.numel(), chunk):
                end = min(start + chunk, dest.numel())
                selected = slice(rows + start, rows + end) if consecutive else rows[start:end]
                self._dequantize_rows(m, b, selected, out, dest[start:end])
        return out

    def _runs_of(self, m: str, b: int, plan: _GroupedPlan, hit: list[int] | None) -> list[tuple[int, int, int]]:
        """``(first, end, row)``: stored rows ``[first, end)`` of matrix ``m`` at ``b`` bits go to the rows from
        ``row`` on of the stack of the experts ``hit`` (None: all); the runs of neighbouring experts
        that continue each other (in the store and in the stack) are merged."""
        starts, runs, merged = self._row_starts()[m][b], plan.runs[m][b], []
        for i, e in enumerate(range(self.num_experts) if hit is None else hit):
            if starts[e + 1] == starts[e]:
                continue
            row = runs[e] - (e - i) * plan.per[m]
            if merged and merged[-1][1] == starts[e] and merged[-1][2] + starts[e] - merged[-1][0] == row:
                merged[-1] = (merged[-1][0], starts[e + 1], merged[-1][2])
            else:
                merged.append((starts[e], starts[e + 1], row))
        return merged

    def grouped_weights(self, x: torch.Tensor, hit: list[int] | None = None) -> GroupedWeights | None:
        """The experts ``hit`` (None: all) dequantized into zero-padded stacks for grouped GEMMs (CPU fp32/bf16,
        CUDA bf16).

        Padded micro-experts have zero weights and biases, so they contribute nothing; codes are
        dequantized straight into ``x``'s dtype, to the values :meth:`weights` gives cast to it.
        """
        layout = self.layout
        if layout.post_norm or not layout.has_gate or not grouped_mm_supported(x):
            return None
        if x.dtype not in (torch.float32, torch.bfloat16) or self.hidden_size * x.element_size() % 16:
            return None
        plan = self._plan(x.device)
        if hit is not None and len(hit) == self.num_experts:
            hit = None
        num, width, hidden = self.num_experts if hit is None else len(hit), plan.width, self.hidden_size
        new = x.new_zeros if plan.padded else x.new_empty  # every row is written unless experts are padded
        gate_up = new(num * 2 * width, hidden)  # gate and up rows straight into the packed layout
        self._stack("gate", plan, hit, gate_up)
        self._stack("up", plan, hit, gate_up)
        if self._spec["down_axis"] == "in":
            down = self._stack("down", plan, hit, new(num * width, hidden)).view(num, width, hidden)
        else:
            kept = self._spec["matrices"]["down"]["length"]
            down = self._stack("down", plan, hit, x.new_empty(num * hidden, kept)).view(num, hidden, kept)
            down = (down if width == kept else nn.functional.pad(down, (0, width - kept))).transpose(1, 2)
        up_bias, down_bias = self._padded_biases(plan, x.dtype)
        return GroupedWeights(gate_up.view(num, 2 * width, hidden).transpose(1, 2), down, up_bias, down_bias,
                              channels=plan.channels, experts=hit)

    def _padded_biases(self, plan: _GroupedPlan, dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Packed gate/up biases ``[E, 2·width]`` (zeros in padded slots) and down biases ``[E, H]``, or Nones."""
        if not self.layout.has_bias:
            return None, None

        def pad(bias: torch.Tensor) -> torch.Tensor:  # [ΣW] -> [E, width]
            return bias.new_zeros(self.num_experts * plan.width).index_put((plan.slots,), bias).view(
                self.num_experts, plan.width).to(dtype)

        up_bias = self.layout.pack(None if self.gate_bias is None else pad(self.gate_bias), pad(self.up_bias), 1)
        return up_bias, self.down_bias.to(dtype)

    def _stores(self, device: torch.device) -> dict[str, list[lowbit.Store]]:
        """Per matrix, its bit-width stores as the low-bit kernels read them (built once per device, on first use)."""
        plan = self._plan(device)
        if plan.stores is None:
            plan.stores = {}
            for m, info in self._spec["matrices"].items():
                plan.stores[m] = []
                for b, starts in plan.starts[m].items():
                    counts = starts.diff()
                    cols = plan.host[m][b] - torch.repeat_interleave(torch.arange(self.num_experts), counts) * plan.per[m]
                    plan.stores[m].append(lowbit.Store(
                        b, getattr(self, f"{m}_q{b}"), getattr(self, f"{m}_s{b}").view(SCALE_DTYPE),
                        getattr(self, f"{m}_z{b}") if b > 1 else None, starts.to(device, torch.int32),
                        cols.to(device, torch.int32), int(counts.max()), info["length"], info["group_size"]))
        return plan.stores

    use_kernels = True
    """Whether forwards may run the low-bit kernels; set False on a module (or the class) for the dequantizing
    path, e.g. to compare the two. Set False for the class, with a warning, if the kernels ever fail."""

    def kernel_rows(self, x: torch.Tensor, routing: SortedRouting, observed: bool
                    ) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """Activations and outputs of the sorted rows ``x`` through the low-bit kernels of
        :mod:`camera_pl.experts.lowbit`, straight from the packed codes (CUDA with Triton, or Triton's
        interpreter); None elsewhere. Gated experts without a post-expert norm, in forwards that need no
        gradient (the kernels have no backward: training steps take the grouped dequantizing path)."""
        layout = self.layout
        if not self.use_kernels or layout.post_norm or not layout.has_gate or not lowbit.available(x):
            return None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return None
        try:
            return self._kernel_rows(x, routing, observed)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # a Triton or driver this code has not met: keep the model usable
            type(self).use_kernels = False
            warnings.warn(f"camera_pl's low-bit kernels failed on {x.device} ({type(err).__name__}: {err}); quantized "
                          "experts use the dequantizing path from now on (same outputs, slower). Please report this.",
                          RuntimeWarning, stacklevel=2)
            return None

    def _kernel_rows(self, x: torch.Tensor, routing: SortedRouting, observed: bool
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
        plan, stores = self._plan(x.device), self._stores(x.device)
        tiles = lowbit.row_tiles(routing.ends, x.device)

        def up(rows: torch.Tensor) -> torch.Tensor:
            proj = (rows.new_zeros if plan.padded else rows.new_empty)(rows.shape[0], 2 * plan.width)
            for store in (*stores["gate"], *stores["up"]):
                lowbit.rows_matmul(rows, tiles, store, proj)
            return proj

        def down(a: torch.Tensor) -> torch.Tensor:
            out = a.new_empty(a.shape[0], self.hidden_size)
            if self._spec["down_axis"] == "in":
                lowbit.columns_matmul(a, tiles, stores["down"], out)
            else:
                for store in stores["down"]:
                    lowbit.rows_matmul(a, tiles, store, out)
            return out

        return projected_rows(self, x, up, down, routing.expert_ids, observed, self._padded_biases(plan, x.dtype),
                              plan.channels)

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
