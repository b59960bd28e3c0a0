"""Single-layer reconstruction (the paper's appendix experiment) and the granularity sweep.

For chosen decoder layers of a dense model, FFN inputs on calibration text (dense inputs, as
in the paper), last 1/8 of the sequences held out. Each method's split + router is fitted with
the same code as ``moefy convert`` and scored on held-out tokens by the relative output error
``sum_t w_t ||Y_hat_t - Y_t||^2 / sum_t w_t ||Y_t||^2``, with the same token weights as the
layer loss of ``moefy convert`` (``w = 1`` with ``--token-weighting none``; with ``clip`` only
tokens above 16x the median output energy are down-weighted):

- ``routed``: split + router, dense weights (what the split alone keeps);
- ``ridge``: after the ridge refit of W_down (moefy's default weight adaptation);
- ``oracle``: the same split with greedy-oracle routing (best k experts per token, known Y);
- ``neuron-oracle``: per token, the best ``active`` fraction of single neurons (by |h_i| ||Wd_i||):
  what any split at that budget could at most hope for.

    python benchmarks/bench_reconstruction.py --layers 5,15,25 --json benchmarks/results/reconstruction.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def capture(model_spec: str, calib: str, tokens: int, seq_len: int, layers: list[int]):
    from moefy.adapters import get_adapter
    from moefy.calibration import from_files
    from moefy.convert import capture_inputs, collect_ffn_io
    from moefy.models import load

    loaded = load(model_spec)
    model = loaded.model
    cal = from_files(loaded.tokenizer, [calib], tokens, seq_len, batch=8)
    adapter = get_adapter(model.config)
    mods = adapter.layers(model)
    xs, kws = capture_inputs(model, adapter, list(cal.ids.split(8)))
    io = {}
    for i, layer in enumerate(mods):
        if i in layers:
            io[i] = collect_ffn_io(layer, layer.mlp, xs, kws[i])
        if i >= max(layers):
            break
        with torch.no_grad():
            xs = [layer(x, **kws[i]) for x in xs]
    return model, adapter, io, cal.n_tokens


def _err(y_hat, y, w) -> float:
    from moefy.layerwise import relative_error

    return relative_error(y_hat, y, w)


@torch.no_grad()
def oracle_error(dot, x, y, w=None) -> float:
    split = dot.split()
    h = dot.hidden(x)
    c = torch.stack([h[:, idx] @ dot.down[:, idx].T for idx in split.experts], 1)
    if dot.shared_idx.numel():
        base = h[:, dot.shared_idx] @ dot.down[:, dot.shared_idx].T
    else:
        base = torch.zeros_like(y)
    _, res = greedy_choice(c, y - base, dot.top_k)
    return _err(y - res, y, w)


def greedy_choice(c: torch.Tensor, res: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy oracle: per token, ``k`` times the expert (contributions ``c``: tokens x E x d) that
    most reduces the residual ``res``; returns (chosen mask, final residual)."""
    chosen = torch.zeros(c.shape[:2], dtype=torch.bool)
    for _ in range(k):
        gain = 2 * torch.einsum("ted,td->te", c, res) - c.pow(2).sum(-1)
        gain[chosen] = -float("inf")
        e = gain.argmax(1)
        chosen[torch.arange(len(e)), e] = True
        res = res - c[torch.arange(len(e)), e]
    return chosen, res


@torch.no_grad()
def neuron_oracle_error(ffn, act, x, y, fraction: float, w=None) -> float:
    h = act(x @ ffn.gate.T) * (x @ ffn.up.T)
    score = h.abs() * ffn.down.norm(dim=0)
    k = int(round(fraction * h.shape[1]))
    keep = torch.zeros_like(h).scatter_(1, score.topk(k, dim=1).indices, 1.0)
    yh = (h * keep) @ ffn.down.T
    return _err(yh, y, w)


def fit(model, adapter, io, i, method, e, k, shared, steps, weights, seed=0, token_weighting="none", **overrides):
    from moefy.config import ConvertConfig
    from moefy.convert import _split_train_val, initial_split, make_layer
    from moefy.layerwise import fit_layer, token_weights
    from moefy.splits import activation_sample

    x, y = io[i]
    cfg = ConvertConfig(method=method, n_experts=e, top_k=k, n_shared=shared, steps=steps, weights=weights, seed=seed,
                        token_weighting=token_weighting, **overrides)
    xt, yt, xv, yv = _split_train_val(x, y, cfg.val_fraction)
    wv = token_weights(yv, yt, cfg.token_clip) if token_weighting == "clip" else None
    mlp = adapter.layers(model)[i].mlp
    ffn = adapter.ffn_weights(mlp)
    act = getattr(mlp, adapter.act_attr)
    with torch.no_grad():
        h = activation_sample(act(xt @ ffn.gate.T) * (xt @ ffn.up.T), seed=seed + i)
    dot = make_layer(mlp, adapter, model.config, initial_split(method, cfg.init, ffn, h, cfg, seed + i), cfg)
    t0 = time.time()
    rep = fit_layer(dot, xt, yt, xv, yv, cfg, i)
    out = {"routed": rep.error_routed, "ridge": rep.error_final, "init": rep.error_init,
           "moved": rep.neurons_moved, "seconds": time.time() - t0}
    if method != "prune":
        out["oracle"] = oracle_error(dot, xv, yv, wv)
    return out, (ffn, act, xv, yv, wv)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="../shared/data/wikitext2/wiki.valid.tokens")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--layers", default="5,15,25")
    ap.add_argument("--methods", default="dot,dot-frozen,random,param-cluster,act-cluster,prune")
    ap.add_argument("--configs", default="8:2,8:4", help="E:k[:shared] for the method table")
    ap.add_argument("--sweep", default="8:2,16:4,32:8,64:16,7:1:192,14:2:192,28:4:192,56:8:192",
                    help="E:k[:shared] granularity sweep (dot and act-cluster)")
    ap.add_argument("--sweep-layers", default="15,25")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--token-weighting", default="none", choices=["clip", "none"])
    ap.add_argument("--json", default="benchmarks/results/reconstruction.json")
    args = ap.parse_args()
    layers = [int(v) for v in args.layers.split(",")]
    sweep_layers = [int(v) for v in args.sweep_layers.split(",")] if args.sweep else []
    model, adapter, io, n_tok = capture(args.model, args.calib, args.calib_tokens, args.seq_len, sorted(set(layers + sweep_layers)))
    results = {"setup": vars(args) | {"calib_tokens_used": n_tok}, "methods": [], "sweep": []}

    def parse(spec: str) -> tuple[int, int, int]:
        parts = [int(v) for v in spec.split(":")]
        return parts[0], parts[1], parts[2] if len(parts) > 2 else 0

    print(f"{'layer':>5} {'E:k:s':>9} {'method':<14}{'routed':>8}{'ridge':>8}{'oracle':>8}{'n-oracle':>9}{'moved':>7}{'sec':>6}")
    for spec in args.configs.split(","):
        e, k, s = parse(spec)
        for i in layers:
            for method in args.methods.split(","):
                r, (ffn, act, xv, yv, wv) = fit(model, adapter, io, i, method, e, k, s, args.steps, "ridge",
                                                token_weighting=args.token_weighting)
                frac = (s + k * (ffn.d_ffn - s) / e) / ffn.d_ffn
                r["neuron_oracle"] = neuron_oracle_error(ffn, act, xv, yv, frac, wv)
                row = {"layer": i, "E": e, "k": k, "shared": s, "method": method, **r}
                results["methods"].append(row)
                print(f"{i:>5} {spec:>9} {method:<14}{r['routed']:>8.3f}{r['ridge']:>8.3f}{r.get('oracle', float('nan')):>8.3f}"
                      f"{r['neuron_oracle']:>9.3f}{r['moved']:>7}{r['seconds']:>6.0f}", flush=True)
                _save(args.json, results)
    for spec in args.sweep.split(",") if args.sweep else []:
        e, k, s = parse(spec)
        for i in sweep_layers:
            for method in ("dot", "act-cluster"):
                r, _ = fit(model, adapter, io, i, method, e, k, s, args.steps, "ridge", token_weighting=args.token_weighting)
                results["sweep"].append({"layer": i, "E": e, "k": k, "shared": s, "method": method, **r})
                print(f"{i:>5} {spec:>9} {method:<14}{r['routed']:>8.3f}{r['ridge']:>8.3f}{r.get('oracle', float('nan')):>8.3f}"
                      f"{'':>9}{r['moved']:>7}{r['seconds']:>6.0f}  (sweep)", flush=True)
                _save(args.json, results)


def _save(path: str, obj: dict) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(p)


if __name__ == "__main__":
    main()
