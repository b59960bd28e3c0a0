"""Model-level selection of a layer's fit (``moefy convert --select model``).

The layer-wise stage scores everything it tries by the held-out error of the layer's own FFN
output.  Measured on stories260K (docs/BENCHMARKS.md section 6.6), that objective and the model's
perplexity disagree: from a good heuristic split, DOT-MoE's assignment training lowers the layer
error and raises the perplexity (param-cluster 37.37 -> DOT from it 40.13).  With ``--select
model`` each converted layer ends as whichever of its candidate fits gives the lower **held-out
KL(dense || model) of the next-token distribution**, measured through the rest of the network:
the layers below as already converted, the candidate in place, the layers above still dense.

The candidates are the layer fitted by the whole recipe (DOT-MoE's assignment and router
training) and the same layer fitted from its initial split without them (least-squares router and
the same weight refit): DOT's training is kept in a layer only where the model says it helps.

The held-out sequences are the calibration sequences the layer-wise stage already holds out (the
last ``val_fraction``, at most ``max_sequences`` of them); their dense log-probabilities are
computed once, before any layer changes.  Cost per converted layer: one forward of those
sequences through the layers from it to the LM head per candidate.  It needs the whole model in
memory (not ``--layer-by-layer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .adapters import Adapter, passthrough_layer
from .errors import ConfigError


def n_held_out(n_seq: int, val_fraction: float) -> int:
    """How many calibration sequences the layer-wise stage holds out (the last ones; the one
    rule, used by :func:`moefy.convert._split_train_val` too)."""
    return min(max(1, int(round(n_seq * val_fraction))), n_seq - 1) if n_seq > 1 else 0


class HeldOutKL:
    """The model-level score of a layer's candidate: mean per-token KL(dense || model) on held-out
    calibration sequences, run from that layer's input up (:meth:`score`)."""

    def __init__(self, model: nn.Module, adapter: Adapter, ids: torch.Tensor, val_fraction: float, max_sequences: int = 4) -> None:
        n_val = n_held_out(int(ids.shape[0]), val_fraction)
        if n_val == 0:
            raise ConfigError("--select model needs at least 2 calibration sequences (one is held out)")
        self.model, self.layers = model, adapter.layers(model)
        self.first = int(ids.shape[0]) - n_val  # index of the first held-out sequence in the calibration
        self.ids = ids[self.first : self.first + min(n_val, max_sequences)]
        with torch.no_grad():  # the dense model's log-probabilities, before any layer changes
            self.teacher = [self._log_probs(self.ids[j : j + 1]) for j in range(len(self.ids))]

    def _log_probs(self, ids: torch.Tensor) -> torch.Tensor:
        device = self.model.get_input_embeddings().weight.device
        logits = self.model(input_ids=ids.to(device), use_cache=False).logits
        return torch.log_softmax(logits.float(), -1)[0].cpu()

    @torch.no_grad()
    def score(self, i: int, hidden_in: Callable[[int], torch.Tensor]) -> float:
        """Held-out KL of the model as it is now, run from decoder layer ``i`` whose input for
        held-out sequence ``j`` is ``hidden_in(j)`` (``[1, seq, d_model]``); the layers below ``i``
        do not run.  Every layer must sit on the embeddings' device."""
        current = [0]

        def inject(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
            ref = args[0] if args else kwargs["hidden_states"]
            x = hidden_in(current[0]).to(device=ref.device, dtype=ref.dtype)
            if args:
                return (x, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}

        below = list(self.layers)[:i]
        for layer in below:
            layer.forward = passthrough_layer  # type: ignore[method-assign]
        handle = self.layers[i].register_forward_pre_hook(inject, with_kwargs=True)
        total, count = 0.0, 0
        try:
            for j in range(len(self.ids)):
                current[0] = j
                logp = self._log_probs(self.ids[j : j + 1])
                t = self.teacher[j]
                total += float((t.exp() * (t - logp)).sum())
                count += int(t.shape[0])
        finally:
            handle.remove()
            for layer in below:
                del layer.forward
        return total / max(1, count)
