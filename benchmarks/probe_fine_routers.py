"""Layer-level: routing for fine experts (16 of 80 experts of 12 neurons + 576 shared by OBS, the best
50% layout of docs/BENCHMARKS.md 6.13).

moefy's own pipeline per layer (DOT-MoE split, 40 steps, LS router, dense W_down kept so that the
routers are compared on the same weights), dense FFN inputs of the first 16,384 tokens of WikiText-2
valid, the last 1/8 of the sequences held out.  Rows (held-out relative error):

- top-k routers, each also after moefy's ridge refit of W_down for its choices:
  moefy's LS router (centred log expert norms); LS onto each expert's greedy gain
  ``2<c_e, r> - ||c_e||^2`` (r: the target minus the shared block, normalised per token); the LS
  router trained by cross-entropy onto the greedy oracle's k experts (Adam, 2,000 steps, keep-best on
  an inner hold-out, as in investigate_routers.py);
- per-token dynamic k: experts whose un-centred LS-predicted log norm passes one threshold for all
  tokens, set on the calibration tokens (or, as a fair-budget check, on the held-out ones) so that
  the mean count is k, optionally capped at 2k per token; and the same rules on the true norms.

    OMP_NUM_THREADS=2 python benchmarks/probe_fine_routers.py 15,25,5 80:16:576 benchmarks/results/fine_routers_50.json
"""
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reconstruction import capture, oracle_error  # noqa: E402
from investigate_routers import evaluate, expert_contribs, greedy_oracle_mask, train_router  # noqa: E402

from moefy.config import ConvertConfig  # noqa: E402
from moefy.convert import _split_train_val, initial_split, make_layer, neuron_order  # noqa: E402
from moefy.layerwise import fit_layer, relative_error  # noqa: E402
from moefy.splits import activation_sample  # noqa: E402


def ridge(x: torch.Tensor, t: torch.Tensor, bias: bool) -> torch.Tensor:
    X = torch.cat([x, torch.ones(len(x), 1)], 1).double() if bias else x.double()
    G = X.T @ X
    lam = 1e-2 * G.diagonal().mean()
    return torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=G.dtype), X.T @ t.double()).float()


def threshold_mask(logits: torch.Tensor, thr: float, cap: int) -> torch.Tensor:
    return ((logits > thr) & (logits >= logits.topk(cap, 1).values[:, -1:])).float()


def calibrate(logits: torch.Tensor, k: int, cap: int) -> float:
    lo, hi = float(logits.min()), float(logits.max())
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if threshold_mask(logits, mid, cap).sum(1).mean() > k else (lo, mid)
    return hi


def main() -> None:
    torch.manual_seed(0)
    layers = [int(a) for a in sys.argv[1].split(",")]
    E, K, S = (int(v) for v in sys.argv[2].split(":"))
    model, adapter, io, _ = capture("smollm2-135m", "../shared/data/wikitext2/wiki.valid.tokens", 16384, 512, layers)
    rows = []
    for i in layers:
        x, y = io[i]
        mlp = adapter.layers(model)[i].mlp
        ffn = adapter.ffn_weights(mlp)
        act = getattr(mlp, adapter.act_attr)
        xt, yt, xv, yv = _split_train_val(x, y, 0.125)
        order = neuron_order(mlp, adapter, xt, yt)
        h = activation_sample(act(xt @ ffn.gate.T) * (xt @ ffn.up.T), seed=i)
        cfg = ConvertConfig(method="dot", n_experts=E, top_k=K, n_shared=S, shared_by="obs", steps=40, weights="none")
        dot = make_layer(mlp, adapter, model.config, initial_split("dot", cfg.init, ffn, h, cfg, i, order), cfg)
        fit_layer(dot, xt, yt, xv, yv, cfg, i)
        data = (xt, yt, xv, yv)
        n_in = xt.shape[0] - (xt.shape[0] // 512 // 8) * 512
        xa, ya, xi, yi = xt[:n_in], yt[:n_in], xt[n_in:], yt[n_in:]
        d = xt.shape[1]

        def add(name: str, r: dict) -> None:
            rows.append({"layer": i, "layout": sys.argv[2], "router": name, **r})
            print(f"L{i} {name:<40} routed {r['routed']:.4f} ridge {r.get('ridge', float('nan')):.4f} "
                  f"mean k {r.get('mean_k', K):.2f}", flush=True)

        add("LS, top-k (moefy)", evaluate(dot, dot.router, data) | {"oracle": oracle_error(dot, xv, yv)})
        with torch.no_grad():
            hh = dot.hidden(xa)
            c = expert_contribs(dot, hh)
            res = ya - hh[:, dot.shared_idx] @ dot.down[:, dot.shared_idx].T
            gain = (2 * torch.einsum("ted,td->te", c, res) - c.pow(2).sum(-1)) / res.pow(2).sum(-1, keepdim=True).clamp_min(1e-6)
            del c, hh
            lin = nn.Linear(d, E, bias=False)
            lin.weight.data.copy_(ridge(xa, gain - gain.mean(-1, keepdim=True), False).T)
        add("LS onto greedy gain, top-k", evaluate(dot, lin, data))
        mask = greedy_oracle_mask(dot, xa, ya)
        t0 = time.time()
        m, info = train_router(copy.deepcopy(dot.router), dot, xa, mask, "ce", xi, yi, 2000, 1e-3, 1)
        info.pop("inner_val_curve", None)
        add("LS + CE onto the greedy oracle, top-k", evaluate(dot, m, data) | info | {"sec": time.time() - t0})
        # per-token dynamic k (dense W_down, no refit)
        with torch.no_grad():
            def parts(xx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                hh = dot.hidden(xx)
                return expert_contribs(dot, hh), hh[:, dot.shared_idx] @ dot.down[:, dot.shared_idx].T

            ct, _ = parts(xt)
            cv, bv = parts(xv)
            tt, tv = torch.log(ct.norm(dim=-1) + 1e-6), torch.log(cv.norm(dim=-1) + 1e-6)
            del ct
            W = ridge(xt, tt, True)
            lt = torch.cat([xt, torch.ones(len(xt), 1)], 1) @ W
            lv = torch.cat([xv, torch.ones(len(xv), 1)], 1) @ W

            def out(m: torch.Tensor) -> float:
                return relative_error(bv + (cv * m[..., None]).sum(1), yv)

            topk = torch.zeros_like(lv).scatter_(1, lv.topk(K, 1).indices, 1.0)
            add("un-centred LS, top-k", {"routed": out(topk)})
            for name, logits_cal, logits, cap in [
                ("un-centred LS, dynamic k (calibration threshold)", lt, lv, E),
                ("un-centred LS, dynamic k (held-out threshold)", lv, lv, E),
                ("un-centred LS, dynamic k <= 2k (held-out thr.)", lv, lv, 2 * K),
                ("true norms, top-k", None, tv, K),
                ("true norms, dynamic k (calibration threshold)", tt, tv, E),
            ]:
                m = threshold_mask(logits, -float("inf"), K) if logits_cal is None else \
                    threshold_mask(logits, calibrate(logits_cal, K, cap), cap)
                add(name, {"routed": out(m), "mean_k": float(m.sum(1).mean()), "max_k": int(m.sum(1).max())})
    Path(sys.argv[3]).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
