"""Where does a 25%-active model lose what the dense model knew?  Oracle and restore probes.

Each probe builds a model in memory and scores it with the quality suite (``quality_suite.py``:
three PPL domains and zero-shot, retention against dense), so capacity, routing and per-layer
losses are told apart on the measure users judge:

* ``neuron F``: the dense model with each FFN keeping, per token, only its ``F * d_ffn`` neurons
  of largest contribution ``|h_i| * ||Wd[:, i]||`` (computed from the dense activations): the best
  any per-token neuron choice at that fraction could do with the dense weights (the TEAL / CATS
  oracle), no expert structure;
* ``shared F CKPT``: the same, but the checkpoint's always-active neurons are kept and the rest of
  the per-token budget is the oracle's: capacity at the checkpoint's layout with dense weights;
* ``experts CKPT``: the checkpoint itself (its trained weights and split), its router replaced
  by an oracle that runs, per token, the ``k`` experts of largest output norm: what its router
  loses against the best choice of its own experts;
* ``restore CKPT A-B``: the checkpoint with the FFNs of layers A..B put back dense (the dense
  model's own FFN weights): what those layers' sparsity costs.

::

    python benchmarks/probe_quality_loss.py neuron 0.25 --json benchmarks/results/quality/oracle_neuron25.json
    python benchmarks/probe_quality_loss.py restore out/smollm2-135m-25pct/recovered 0-5 --json ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

import quality_suite as qs
from moefy.models import load

DENSE = "smollm2-135m"


class OracleNeuronMLP(nn.Module):
    """A dense gated FFN that keeps, per token, its ``keep`` neurons of largest contribution
    (plus ``always``, kept whatever the token)."""

    def __init__(self, mlp: nn.Module, keep: int, always: torch.Tensor | None = None) -> None:
        super().__init__()
        self.mlp = mlp
        self.keep = keep
        self.register_buffer("col_norm", mlp.down_proj.weight.float().norm(dim=0), persistent=False)
        mask = torch.zeros(self.col_norm.numel(), dtype=torch.bool)
        if always is not None:
            mask[always] = True
        self.register_buffer("always", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mlp
        h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        score = h.abs().float() * self.col_norm
        score = score.masked_fill(self.always, float("inf"))
        n_keep = self.keep + int(self.always.sum())
        idx = score.topk(n_keep, dim=-1).indices
        mask = torch.zeros_like(h).scatter_(-1, idx, 1.0)
        return m.down_proj(h * mask)


class OracleExpertRouter(nn.Module):
    """Wraps a :class:`MoefyMLP`: every expert computed, the ``k`` of largest output norm run."""

    def __init__(self, moe: nn.Module) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.moe
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        h = m.act_fn(m.gate_proj(x2)) * m.up_proj(x2)
        w = m.down_proj.weight
        norms = []
        for e in range(m.n_experts):
            lo, hi = m.offsets[e], m.offsets[e + 1]
            norms.append((h[:, lo:hi] @ w[:, lo:hi].T).norm(dim=-1))
        top = torch.stack(norms, -1).topk(int(m.top_k), dim=-1).indices
        weights = torch.zeros(x2.shape[0], m.n_experts, dtype=h.dtype).scatter_(-1, top, 1.0)
        out = m.down_proj(h * m.neuron_mask(weights))
        return out.reshape(shape)


def _layers(model: nn.Module) -> list[nn.Module]:
    base = getattr(model, "model", model)
    base = getattr(base, "model", base)
    return list(base.layers)


def build(kind: str, args: argparse.Namespace) -> tuple[nn.Module, Any, str]:
    if kind == "neuron":
        d = load(DENSE)
        for layer in _layers(d.model):
            layer.mlp = OracleNeuronMLP(layer.mlp, int(round(args.fraction * layer.mlp.gate_proj.out_features)))
        return d.model, d.tokenizer, f"oracle neurons {args.fraction:g}"
    if kind == "shared":
        d = load(DENSE)
        rec = json.loads((Path(args.ckpt) / "moefy.json").read_text())
        for layer, spec in zip(_layers(d.model), rec["layers"]):
            total = int(round(args.fraction * layer.mlp.gate_proj.out_features))
            shared = torch.tensor(spec["neurons"][: spec["n_shared"]], dtype=torch.long)
            layer.mlp = OracleNeuronMLP(layer.mlp, max(0, total - len(shared)), shared)
        return d.model, d.tokenizer, f"oracle neurons {args.fraction:g} beside {Path(args.ckpt).name}'s shared"
    if kind == "experts":
        c = load(args.ckpt)
        for layer in _layers(c.model):
            if getattr(layer.mlp, "n_experts", 0) > 0:
                layer.mlp = OracleExpertRouter(layer.mlp)
        return c.model, c.tokenizer, f"{Path(args.ckpt).name}, oracle expert choice"
    if kind == "restore":
        lo, hi = (int(v) for v in args.layers.split("-"))
        c, d = load(args.ckpt), load(DENSE)
        for i, (lc, ld) in enumerate(zip(_layers(c.model), _layers(d.model))):
            if lo <= i <= hi:
                lc.mlp = ld.mlp
        return c.model, c.tokenizer, f"{Path(args.ckpt).name}, layers {lo}-{hi} dense"
    raise SystemExit(f"unknown probe {kind!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["neuron", "shared", "experts", "restore"])
    ap.add_argument("rest", nargs="*", help="neuron F | shared F CKPT | experts CKPT | restore CKPT A-B")
    ap.add_argument("--json", type=Path, required=True)
    qs.add_args(ap)
    args = ap.parse_args()
    r = args.rest
    args.fraction = float(r[0]) if args.kind in ("neuron", "shared") else None
    args.ckpt = {"shared": r[1] if len(r) > 1 else None, "experts": r[0] if r else None,
                 "restore": r[0] if r else None}.get(args.kind)
    args.layers = r[1] if args.kind == "restore" and len(r) > 1 else None
    st = qs.settings(args)
    dense = qs.score(DENSE, st)
    dense["label"] = "dense"
    with torch.no_grad():
        model, tok, label = build(args.kind, args)
        model.eval()
        res = qs.score(label, st, model=model, tokenizer=tok, ident=None)
    res["label"] = label
    rows = qs.summarize([dense, res])
    qs.write_json(args.json, {"command": " ".join(sys.argv), "settings": st, "rows": rows, "results": [dense, res]})
    print(qs.markdown(rows))


if __name__ == "__main__":
    main()
