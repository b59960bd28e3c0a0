"""Stronger routers at the layer level (issue 14, item 2), each at the linear router's decode cost.

One split per (layer, layout), fitted exactly as ``moefy convert`` fits it (DOT-MoE, 40 steps,
``bench_reconstruction.fit``'s setup: dense FFN inputs of the first 16,384 tokens of WikiText-2
valid, the last 1/8 of the sequences held out).  On that fixed split every router is trained on
the calibration part only and scored on the held-out part only, by the relative output error
``||Y_hat - Y||^2 / ||Y||^2``:

- ``routed``: the router's top-k experts, dense weights;
- ``ridge``: after moefy's ridge refit of W_down (``layerwise.ridge_refit_down``) for that
  router's choices.

Routers (a router is any map x -> E scores; the top-k scores pick the experts, weight 1 each,
as DOT-MoE's "mask" gating):

- ``linear LS``: moefy's least-squares router (``layerwise.init_router``, what convert keeps);
- ``linear CE``: the same d x E matrix trained by cross-entropy on the oracle top-k
  (a control: the objective without the nonlinearity);
- ``MLP``: one hidden layer (SiLU) on standardised inputs, hidden width chosen to fill the cost budget; trained either
  by MSE onto the LS router's target (centred log of each expert's output norm) or by
  cross-entropy onto the oracle top-k experts; ``+skip``: the LS linear router plus an
  MLP correction (initialised at the LS router);
- ``low-rank W_gate``: rank-r factor of W_gate (plain truncated SVD, or the SVD of W_gate C^(1/2),
  C the calibration input covariance, the rank-r map with least error on those inputs); each
  routed neuron's gate pre-activation is predicted, each expert scored by
  sum_i |act(g_i)| * w_i with w_i = ||W_down[:, i]|| * rms(up_i) (the up projection's typical size
  on calibration), as MoEfication's / Deja Vu's predictors score activation mass;
- ``sampled``: exact gate pre-activations of the s highest-importance neurons of every expert,
  expert score = its importance share / the samples' share * sum_i |act(g_i)| * w_i
  (``+up``: exact h_i = act(g_i) * up_i for the samples, half as many).

Cost: multiply-adds per token.  The linear router is d_model x E; the active FFN 3 x d_model x
(active neurons).  Every router gets at most 5% of (linear router + active FFN) in extra MACs;
widths, ranks and sample counts are the largest that fit.

    # one (layer, layout) per run, 5-7 min each on one CPU thread; each run adds its rows to the JSON
    for l in 15 25; do for lay in 8:2 26:2:288; do
      OMP_NUM_THREADS=1 python benchmarks/investigate_routers.py --layers $l --layouts $lay \
          --json benchmarks/results/investigate_routers.json
    done; done

(``26:2:288``: 288 shared neurons by pruning importance + 2 of 26 experts, the best 25% layout.)
The reference row ``oracle`` picks, per token with Y known, the best k experts (the exact best
pair at k = 2) for the dense W_down, and the ridge refit is then done for those choices.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_reconstruction import _save, capture, greedy_choice  # noqa: E402


# ---------------------------------------------------------------------- routers
class Scored(nn.Module):
    """Wraps a score function as the layer's ``router`` (DotMoeLayer calls ``router(x)``)."""

    def __init__(self, fn, params: nn.Module | None = None):
        super().__init__()
        self.fn = fn
        self.params = params

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class MLPRouter(nn.Module):
    def __init__(self, d: int, h: int, e: int, skip: torch.Tensor | None = None, x: torch.Tensor | None = None):
        super().__init__()
        # inputs standardised per dimension on calibration (folds into fc1: no extra MACs)
        self.register_buffer("mu", x.mean(0) if x is not None else torch.zeros(d))
        self.register_buffer("sd", x.std(0).clamp(min=1e-6) if x is not None else torch.ones(d))
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, e)
        self.skip = None
        if skip is not None:  # LS linear router + MLP correction, starting at the LS router
            self.skip = nn.Linear(d, e, bias=False)
            self.skip.weight.data.copy_(skip)
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc2(nn.functional.silu(self.fc1((x - self.mu) / self.sd)))
        return out + self.skip(x) if self.skip is not None else out


def expert_contribs(dot, h: torch.Tensor) -> torch.Tensor:
    split = dot.split()
    return torch.stack([h[:, idx] @ dot.down[:, idx].T for idx in split.experts], 1)  # [T, E, d]


@torch.no_grad()
def greedy_oracle_mask(dot, x: torch.Tensor, y: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """Per token, the best k experts for reconstructing Y (Y known): the exact best pair at k = 2,
    else bench_reconstruction.oracle_error's greedy rule."""
    out = []
    for s in range(0, x.shape[0], chunk):
        xs, ys = x[s : s + chunk], y[s : s + chunk]
        h = dot.hidden(xs)
        c = expert_contribs(dot, h)
        base = h[:, dot.shared_idx] @ dot.down[:, dot.shared_idx].T if dot.shared_idx.numel() else torch.zeros_like(ys)
        res = ys - base
        chosen = torch.zeros(c.shape[:2], dtype=torch.bool)
        if dot.top_k == 2:  # exact: the best pair, from <c_a, res> and the Gram matrix of the c_e
            b = torch.einsum("ted,td->te", c, res)
            gram = torch.einsum("ted,tfd->tef", c, c)
            dg = gram.diagonal(dim1=1, dim2=2)
            gain = 2 * (b[:, :, None] + b[:, None, :]) - dg[:, :, None] - dg[:, None, :] - 2 * gram
            n_e = c.shape[1]
            gain[:, torch.eye(n_e, dtype=torch.bool)] = -float("inf")
            best = gain.reshape(len(gain), -1).argmax(1)
            rows = torch.arange(len(best))
            chosen[rows, best // n_e] = True
            chosen[rows, best % n_e] = True
            out.append(chosen)
            continue
        out.append(greedy_choice(c, res, dot.top_k)[0])
    return torch.cat(out)


@torch.no_grad()
def lognorm_target(dot, x: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """init_router's target: centred log of each expert's output norm."""
    ts = []
    for s in range(0, x.shape[0], chunk):
        c = expert_contribs(dot, dot.hidden(x[s : s + chunk]))
        t = torch.log(c.norm(dim=-1) + 1e-6)
        ts.append(t - t.mean(-1, keepdim=True))
    return torch.cat(ts)


class OracleRouter(nn.Module):
    """Greedy-oracle expert choice (Y known) as a router: scores 1 for the chosen experts of each
    row of the registered tensors (looked up by storage; every caller passes row slices of them)."""

    def __init__(self):
        super().__init__()
        self.known: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        for full, mask in self.known:
            if xs.untyped_storage().data_ptr() == full.untyped_storage().data_ptr():
                off = xs.storage_offset() - full.storage_offset()
                r0 = off // full.stride(0)
                if off < 0 or r0 + xs.shape[0] > full.shape[0]:
                    continue
                return mask[r0 : r0 + xs.shape[0]].to(xs.dtype)
        raise KeyError("oracle router called on unknown rows")


def routed_error(dot, router: nn.Module, x, y) -> float:
    from moefy.layerwise import _eval_error

    saved = dot.router
    dot.router = router
    try:
        return _eval_error(dot, x, y, None)
    finally:
        dot.router = saved


def train_router(model: nn.Module, dot, x, tgt, loss_kind: str, xi, yi, steps: int, lr: float, seed: int,
                 batch: int = 1024, eval_every: int = 100, wd: float = 0.0) -> tuple[nn.Module, dict]:
    """Adam on the calibration part ``x`` (minus an inner hold-out ``xi, yi`` used only to keep
    the best state by routed output error).  ``loss_kind``: "mse" onto ``tgt`` (centred log
    norms) or "ce" onto ``tgt`` (oracle top-k mask, as a k-hot distribution)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    best = routed_error(dot, model, xi, yi)
    best_state, best_step = copy.deepcopy(model.state_dict()), 0
    curve = [round(best, 4)]
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=g)
        out = model(x[idx])
        if loss_kind == "mse":
            loss = (out - tgt[idx]).pow(2).mean()
        else:
            t = tgt[idx].float()
            loss = -(t / t.sum(-1, keepdim=True) * torch.log_softmax(out, -1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            with torch.no_grad():
                err = routed_error(dot, model, xi, yi)
            curve.append(round(err, 4))
            if err < best:
                best, best_state, best_step = err, copy.deepcopy(model.state_dict()), step + 1
    model.load_state_dict(best_state)
    return model, {"inner_val_routed": best, "best_step": best_step, "inner_val_curve": curve}


def neuron_weights(dot, x: torch.Tensor) -> torch.Tensor:
    """w_i = ||W_down[:, i]|| * rms(up_i(x)) on calibration inputs."""
    with torch.no_grad():
        u = nn.functional.linear(x[:8192], dot.up, dot.up_bias)
        return dot.down.norm(dim=0) * u.pow(2).mean(0).sqrt()


def lowrank_router(dot, x: torch.Tensor, r: int, whiten: bool, with_up: bool, w: torch.Tensor) -> nn.Module:
    """Predicted gate (and up) pre-activations of the routed neurons from a rank-r factor;
    expert score = sum over its neurons of |act(g_hat)| * w (or |act(g_hat) * u_hat| * ||W_down||)."""
    ridx = dot.routed_idx
    assign = dot.hard_assignment()
    e = dot.n_experts
    with torch.no_grad():
        if whiten:
            cov = x.T @ x / x.shape[0]
            cov.diagonal().add_(1e-6 * cov.diagonal().mean())
            lch = torch.linalg.cholesky(cov)  # C = L L^T
        else:
            lch = None

        def factor(wmat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            wl = wmat @ lch if lch is not None else wmat
            u, s, vh = torch.linalg.svd(wl, full_matrices=False)
            p = vh[:r].T  # d x r
            if lch is not None:  # x W^T ~ (x L^{-T} V_r) (U_r S_r)^T
                p = torch.linalg.solve_triangular(lch.T, p, upper=True)
            return p.contiguous(), (u[:, :r] * s[:r]).contiguous()

        pg, qg = factor(dot.gate[ridx])
        pu, qu = factor(dot.up[ridx]) if with_up else (None, None)
        onehot = torch.nn.functional.one_hot(assign, e).float()  # n_routed x E
        dn = dot.down[:, ridx].norm(dim=0)
        wr = w[ridx]

    def score(xx: torch.Tensor) -> torch.Tensor:
        g = (xx @ pg) @ qg.T
        if dot.gate_bias is not None:
            g = g + dot.gate_bias[ridx]
        a = dot.act_fn(g)
        if with_up:
            uu = (xx @ pu) @ qu.T
            m = (a * uu).abs() * dn
        else:
            m = a.abs() * wr
        return m @ onehot

    return Scored(score)


def sampled_router(dot, imp: torch.Tensor, s: int, with_up: bool, w: torch.Tensor) -> tuple[nn.Module, int]:
    """Exact gate (and up) pre-activations of the s highest-importance neurons of each expert."""
    split = dot.split()
    picks, owner, scale = [], [], []
    for e, idx in enumerate(split.experts):
        top = idx[imp[idx].topk(min(s, idx.numel())).indices]
        picks.append(top)
        owner += [e] * top.numel()
        scale.append(float(imp[idx].sum() / imp[top].sum().clamp(min=1e-12)))
    sel = torch.cat(picks)
    onehot = torch.nn.functional.one_hot(torch.tensor(owner), split.n_experts).float() * torch.tensor(scale)
    wg, wu = dot.gate[sel].clone(), dot.up[sel].clone()
    dn, ws = dot.down[:, sel].norm(dim=0), w[sel]

    def score(xx: torch.Tensor) -> torch.Tensor:
        a = dot.act_fn(xx @ wg.T)
        m = (a * (xx @ wu.T)).abs() * dn if with_up else a.abs() * ws
        return m @ onehot

    return Scored(score), int(sel.numel())


# ------------------------------------------------------------------------ main
def fit_split(model, adapter, io, i, e, k, shared, steps, seed=0):
    """The DOT-MoE split and LS router exactly as bench_reconstruction.fit / moefy convert fit
    them, with dense W_down kept (weights="none"; the split and router do not depend on it)."""
    from moefy.config import ConvertConfig
    from moefy.convert import _split_train_val, initial_split, make_layer
    from moefy.layerwise import fit_layer
    from moefy.splits import activation_sample, pruning_importance

    x, y = io[i]
    over = {"shared_by": "importance"} if shared else {}
    cfg = ConvertConfig(method="dot", n_experts=e, top_k=k, n_shared=shared, steps=steps, weights="none", seed=seed,
                        token_weighting="none", **over)
    xt, yt, xv, yv = _split_train_val(x, y, cfg.val_fraction)
    mlp = adapter.layers(model)[i].mlp
    ffn = adapter.ffn_weights(mlp)
    act = getattr(mlp, adapter.act_attr)
    with torch.no_grad():
        h = activation_sample(act(xt @ ffn.gate.T) * (xt @ ffn.up.T), seed=seed + i)
    dot = make_layer(mlp, adapter, model.config, initial_split("dot", cfg.init, ffn, h, cfg, seed + i), cfg)
    rep = fit_layer(dot, xt, yt, xv, yv, cfg, i)
    imp = pruning_importance(h, ffn)
    return dot, rep, (xt, yt, xv, yv), imp


def evaluate(dot, router: nn.Module, data) -> dict:
    from moefy.layerwise import _Data, ridge_refit_down

    xt, yt, xv, yv = data
    w0 = dot.down.detach().clone()
    saved = dot.router
    dot.router = router
    try:
        with torch.no_grad():
            routed = routed_error(dot, router, xv, yv)
            ridge, gamma = ridge_refit_down(dot, _Data(xt, yt, xv, yv))
            dot(xv[:8192])
            load = dot.aux["hard"].float().mean(0)
    finally:
        with torch.no_grad():
            dot.down.copy_(w0)
        dot.router = saved
    return {"routed": routed, "ridge": ridge, "ridge_gamma": gamma,
            "max_load": round(float(load.max() / load.mean()), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="../shared/data/wikitext2/wiki.valid.tokens")
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--layers", default="15")
    ap.add_argument("--layouts", default="8:2", help="E:k[:shared by importance], comma-separated")
    ap.add_argument("--steps", type=int, default=40, help="DOT-MoE split steps (moefy's default)")
    ap.add_argument("--budget", type=float, default=0.05, help="extra router MACs allowed, fraction of the linear total")
    ap.add_argument("--train-steps", type=int, default=2000, help="Adam steps of the trained routers")
    ap.add_argument("--only", default=None, help="comma-separated router names (substring match)")
    ap.add_argument("--cache", default="/tmp/moefy_router_io.pt", help="captured FFN inputs/outputs (reused if present)")
    ap.add_argument("--json", default="benchmarks/results/investigate_routers.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    layers = [int(v) for v in args.layers.split(",")]
    from moefy.adapters import get_adapter
    from moefy.models import load

    cache = Path(args.cache)
    io = torch.load(cache) if cache.exists() else {}
    if not all(i in io for i in layers):
        model, adapter, new_io, _ = capture(args.model, args.calib, args.calib_tokens, 512, layers)
        io.update(new_io)
        torch.save(io, cache)
    else:
        model = load(args.model).model
        adapter = get_adapter(model.config)
    prev = {}
    if Path(args.json).exists():
        import json

        prev = json.loads(Path(args.json).read_text())
    # rows of other (layer, layout) pairs from earlier runs into the same JSON are kept
    results = {"setup": {"model": args.model, "calib": args.calib, "calib_tokens": args.calib_tokens, "seq_len": 512,
                         "held_out": "last 1/8 of the sequences", "split": "DOT-MoE, moefy defaults, seed 0"},
               "runs": prev.get("runs", []) + [vars(args)],
               "rows": [r for r in prev.get("rows", []) if not (r["layer"] in layers and r["layout"] in args.layouts.split(","))]}
    print(f"{'layer':>5} {'layout':>9} {'router':<44}{'MACs':>8}{'extra%':>7}{'routed':>8}{'ridge':>8}{'load':>6}{'sec':>5}",
          flush=True)
    for spec in args.layouts.split(","):
        parts = [int(v) for v in spec.split(":")]
        e, k, shared = parts[0], parts[1], parts[2] if len(parts) > 2 else 0
        for i in layers:
            t0 = time.time()
            dot, rep, data, imp = fit_split(model, adapter, io, i, e, k, shared, args.steps)
            xt, yt, xv, yv = data
            d, n = dot.gate.shape[1], dot.d_ffn
            n_routed = n - shared
            active = shared + k * n_routed // e
            ffn_macs = 3 * d * active
            lin_macs = d * e
            lin_total = lin_macs + ffn_macs
            cap = lin_macs + args.budget * lin_total  # router MACs allowed
            print(f"# layer {i} {spec}: split fitted in {time.time() - t0:.0f}s (LS routed {rep.error_routed:.3f}); "
                  f"linear total {lin_total} MACs, router cap {cap:.0f}", flush=True)
            # inner hold-out for keep-best of trained routers: the last 1/8 of the calibration part
            n_in = xt.shape[0] - (xt.shape[0] // 512 // 8) * 512
            xa, ya, xi, yi = xt[:n_in], yt[:n_in], xt[n_in:], yt[n_in:]
            w = neuron_weights(dot, xt)
            lin = copy.deepcopy(dot.router)
            # the trained routers start from / are compared with an LS router fitted without the
            # inner hold-out (the kept one saw it: keep-best against it would be in-sample)
            from moefy.layerwise import init_router

            with torch.no_grad():
                init_router(dot, xa, dot.hidden(xa))
            lin_a = copy.deepcopy(dot.router)
            dot.router = copy.deepcopy(lin)
            hid = int((cap - 0) // (d + e))
            hid_skip = int((cap - lin_macs) // (d + e))
            r_gate = int((cap - n_routed) // (d + n_routed))
            r_gu = int((cap - n_routed) // (2 * (d + n_routed)))
            s_gate = max(1, int(cap // (e * d)))
            s_gu = max(1, int(cap // (e * 2 * d)))
            cands = []  # (name, builder -> (module, macs, info))

            def add(name, build):
                if args.only is None or any(o in name for o in args.only.split(",")):
                    cands.append((name, build))

            add("linear LS (moefy)", lambda: (lin, lin_macs, {}))
            oracle_cache: dict[str, torch.Tensor] = {}

            def oracle_t() -> torch.Tensor:
                if "m" not in oracle_cache:
                    oracle_cache["m"] = greedy_oracle_mask(dot, xa, ya)
                return oracle_cache["m"]

            def lintarget() -> torch.Tensor:
                if "t" not in oracle_cache:
                    oracle_cache["t"] = lognorm_target(dot, xa)
                return oracle_cache["t"]

            def lin_ce():
                torch.manual_seed(1)
                m = nn.Linear(d, e, bias=False)
                m.weight.data.copy_(lin_a.weight.data)
                m, info = train_router(m, dot, xa, oracle_t(), "ce", xi, yi, args.train_steps, 1e-3, 1)
                return m, lin_macs, info

            add("linear CE on oracle top-k", lin_ce)

            def mlp(loss: str, skip: bool, hidden: int, lr: float = 1e-3):
                def build():
                    torch.manual_seed(2)
                    m = MLPRouter(d, hidden, e, lin_a.weight.data if skip else None, xa)
                    tgt = oracle_t() if loss == "ce" else lintarget()
                    m, info = train_router(m, dot, xa, tgt, loss, xi, yi, args.train_steps, lr, 2)
                    info["lr"] = lr
                    return m, d * hidden + hidden * e + (lin_macs if skip else 0), info | {"hidden": hidden}
                return build

            add(f"MLP h{hid} SiLU, MSE on log expert norms", mlp("mse", False, hid))
            add(f"MLP h{hid} SiLU, CE on oracle top-k", mlp("ce", False, hid))
            add(f"linear LS + MLP h{hid_skip} (skip), MSE", mlp("mse", True, hid_skip, 3e-4))
            add(f"linear LS + MLP h{hid_skip} (skip), CE", mlp("ce", True, hid_skip, 3e-4))
            for whiten in (False, True):
                tag = "C^1/2-SVD" if whiten else "SVD"
                add(f"low-rank W_gate r{r_gate} ({tag})",
                    lambda whiten=whiten: (lowrank_router(dot, xt, r_gate, whiten, False, w),
                                           r_gate * (d + n_routed) + n_routed, {"rank": r_gate}))
            add(f"low-rank W_gate+W_up r{r_gu} (C^1/2-SVD)",
                lambda: (lowrank_router(dot, xt, r_gu, True, True, w), 2 * r_gu * (d + n_routed) + n_routed, {"rank": r_gu}))
            for up, s in ((False, s_gate), (True, s_gu)):
                def samp(up=up, s=s):
                    m, n_s = sampled_router(dot, imp, s, up, w)
                    return m, n_s * d * (2 if up else 1) + n_s, {"samples_per_expert": s}
                add(f"sampled gate preacts, top-{s} imp./expert" + (" (+up)" if up else ""), samp)
            # the same sampled routers at roughly 4x the budget: is the idea limited by the budget?
            for up, s in ((False, 4 * s_gate),):
                def samp4(up=up, s=s):
                    m, n_s = sampled_router(dot, imp, s, up, w)
                    return m, n_s * d + n_s, {"samples_per_expert": s, "over_budget": True}
                add(f"sampled gate preacts, top-{s} imp./expert (4x budget)", samp4)

            for name, build in cands:
                t1 = time.time()
                module, macs, info = build()
                r = evaluate(dot, module, data)
                extra = (macs - lin_macs) / lin_total
                row = {"layer": i, "layout": spec, "E": e, "k": k, "shared": shared, "router": name,
                       "router_macs": int(macs), "ffn_macs": ffn_macs, "total_macs": int(macs + ffn_macs),
                       "extra_vs_linear_total": extra, **r, **info, "seconds": time.time() - t1}
                results["rows"].append(row)
                print(f"{i:>5} {spec:>9} {name:<44}{macs:>8}{100 * extra:>6.1f}%{r['routed']:>8.3f}{r['ridge']:>8.3f}"
                      f"{r['max_load']:>6.2f}{time.time() - t1:>5.0f}", flush=True)
                _save(args.json, results)
            # reference: greedy-oracle expert choice (Y known, on calibration and held-out tokens alike)
            orc_router = OracleRouter()
            orc_router.known = [(xt, greedy_oracle_mask(dot, xt, yt)), (xv, greedy_oracle_mask(dot, xv, yv))]
            r = evaluate(dot, orc_router, data)
            orc = {"layer": i, "layout": spec, "E": e, "k": k, "shared": shared, "router": "oracle (best k, Y known)",
                   **r, "ls_routed_fit": rep.error_routed}
            results["rows"].append(orc)
            print(f"{i:>5} {spec:>9} {'oracle (best k, Y known)':<44}{'':>8}{'':>7}{r['routed']:>8.3f}{r['ridge']:>8.3f}"
                  f"{r['max_load']:>6.2f}", flush=True)
            _save(args.json, results)


if __name__ == "__main__":
    main()
