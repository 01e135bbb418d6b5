"""Brute-force recomputation used by the tests: every token through every expert.

Independent of camera_pl's experts forward: it uses only the adapter's weight *views*
and the module's own gating function, and checks itself against the model's output.
"""

import torch

from camera_pl.arch.adapters import MoELayer


def capture_block_inputs(model, layers: list[MoELayer], batch: dict) -> dict[int, torch.Tensor]:
    """Run the model with its default experts implementation and record each MoE block's input."""
    seen, handles = {}, []
    for layer in layers:
        def hook(module, args, index=layer.index):
            seen[index] = args[0].detach().reshape(-1, args[0].shape[-1])
        handles.append(layer.block.register_forward_pre_hook(hook))
    outputs = {}
    for layer in layers:
        def out_hook(module, args, output, index=layer.index):
            out = output[0] if isinstance(output, tuple) else output
            outputs[index] = out.detach().reshape(-1, out.shape[-1])
        handles.append(layer.block.register_forward_hook(out_hook))
    with torch.no_grad():
        model(**batch)
    for h in handles:
        h.remove()
    return seen, outputs


def dense_layer(layer: MoELayer, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """All-experts activations a [T, E, I], dense routing weights g [T, E], outputs, probs."""
    with torch.no_grad():
        logits, weights, index = layer.route(x)
        T, E = x.shape[0], layer.num_experts
        g = torch.zeros(T, E, dtype=torch.float64, device=x.device).scatter(1, index, weights.double())
        w = layer.experts.stacked()
        up_proj = torch.einsum("th,eih->tei", x.double(), w.up.double())
        gate_proj = torch.einsum("th,eih->tei", x.double(), w.gate.double()) if w.gate is not None else None
        if w.up_bias is not None:
            up_proj = up_proj + w.up_bias.double()
            if gate_proj is not None:
                gate_proj = gate_proj + w.gate_bias.double()
        a = layer.experts.act(gate_proj, up_proj)
        f = torch.einsum("tei,ehi->teh", a, w.down.double())
        if w.down_bias is not None:
            f = f + w.down_bias.double()
        y = torch.einsum("te,teh->th", g, f)
        shared_a = shared_g = None
        if layer.shared is not None:
            s = layer.shared
            shared_a = s.act_fn(s.gate_proj(x).double()) * s.up_proj(x).double()
            shared_g = torch.ones(T, dtype=torch.float64, device=x.device)
            if layer.shared_gate is not None:
                shared_g = layer.shared_gate_values(x).double()
            y = y + shared_g[:, None] * (shared_a @ s.down_proj.weight.double().t())
        return {"a": a, "g": g, "f": f, "y": y, "probs": layer.router_probs(logits).double(), "index": index,
                "weights": weights.double(), "shared_a": shared_a, "shared_g": shared_g}
