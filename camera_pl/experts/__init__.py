"""Routed-experts modules and the one interface they all answer.

* :mod:`.base` — the interface (:class:`~.base.Experts`), the view over transformers' fused experts;
* :mod:`.modulelist` — the view over an ``nn.ModuleList`` of per-expert MLPs (remote-code layouts);
* :mod:`.forward` — camera_pl's experts forward, shared by every kind;
* :mod:`.module` — the base class of camera_pl's own modules;
* :mod:`.ragged`, :mod:`.quantized`, :mod:`.compressed`, :mod:`.fake_quant` — the kinds;
* :mod:`.kinds` — describe/rebuild modules for saving and loading.
"""
