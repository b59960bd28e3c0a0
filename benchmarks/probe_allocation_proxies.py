"""Probe (session 21): do cheap per-layer error proxies pick better per-layer budgets than uniform?

Structured pruning only (no routing): every FFN of SmolLM2-135M keeps its most important neurons
(|h| x W_down norm) with W_down refitted by ridge, on the dense model's own FFN inputs (first 16,384
tokens of WikiText-2 valid).  Budgets per layer: uniform, or greedy on one of two proxies measured
at budgets 64..1536: the relative output error ("rel"), and the error scaled per token by the next
layer's input norm ("norm"; "norm-no-last" caps the last layer).  PPL on the first 8 windows of
1,024 tokens of WikiText-2 raw test.  Both proxies lost to uniform (docs/BENCHMARKS.md 6.12), which
is why --allocate kl measures the model's held-out KL instead.

    OMP_NUM_THREADS=2 python benchmarks/probe_allocation_proxies.py
"""
import sys, json, torch, math, copy
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
from moefy.models import load
from moefy.calibration import from_files
from moefy.evaluate import load_eval_ids
torch.manual_seed(0)
V = str(ROOT.parent / "shared/data/wikitext2/wiki.valid.tokens"); T = str(ROOT.parent / "shared/data/wikitext2/wiki.test.raw")
m = load("smollm2-135m"); model, tok = m.model.eval(), m.tokenizer
ids = from_files(tok, [V], 16384, 512).ids
test = load_eval_ids(tok, T)[: 8 * 1024].view(8, 1024)
layers = model.model.layers
cap = {}
def mk(i):
    def pre(mod, args): cap.setdefault(("x", i), []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
    return pre
def mkout(i):
    def post(mod, args, out):
        o = out[0] if isinstance(out, tuple) else out
        cap.setdefault(("r", i), []).append(o.detach().reshape(-1, o.shape[-1]))
    return post
hs = []
for i, L in enumerate(layers):
    hs.append(L.mlp.register_forward_pre_hook(mk(i))); hs.append(L.register_forward_hook(mkout(i)))
with torch.no_grad():
    for b in ids.split(4): model(input_ids=b, use_cache=False)
for h in hs: h.remove()
@torch.no_grad()
def ppl(mdl):
    nll = n = 0
    for w in test.split(2):
        lg = mdl(input_ids=w, use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), w[:, 1:].reshape(-1), reduction="sum")); n += w[:, 1:].numel()
    return math.exp(nll / n)
budgets = list(range(64, 1536 + 1, 32))
data = {}
curves = {"rel": {}, "norm": {}}
for i, L in enumerate(layers):
    x = torch.cat(cap.pop(("x", i))).float(); r = torch.cat(cap.pop(("r", i))).float()
    mlp = L.mlp
    with torch.no_grad():
        h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x); y = mlp.down_proj(h)
    n = x.shape[0]; tr = slice(0, n * 3 // 4); va = slice(n * 3 // 4, n)
    imp = h[tr].abs().mean(0) * mlp.down_proj.weight.norm(dim=0)
    order = imp.argsort(descending=True)
    gnext = (layers[i + 1].input_layernorm.weight if i + 1 < len(layers) else model.model.norm.weight).float()
    rms = r[va].pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    yn = (y[va] ** 2).sum(-1).mean().item()
    cr, cn = [], []
    for kb in budgets:
        idx = order[:kb]; z = h[tr][:, idx]; zv = h[va][:, idx]
        W0 = mlp.down_proj.weight[:, idx].T
        G = z.T @ z; lam = 1e-3 * G.diagonal().mean()
        W = torch.linalg.solve(G + lam * torch.eye(kb), z.T @ y[tr] + lam * W0)
        e = zv @ W - y[va]
        cr.append((e ** 2).sum(-1).mean().item() / yn); cn.append(((e * gnext / rms) ** 2).sum(-1).mean().item())
    curves["rel"][i] = cr; curves["norm"][i] = cn
    data[i] = (x, y, order)
    print("layer", i, "rel@384 %.3f norm@384 %.3f" % (cr[budgets.index(384)], cn[budgets.index(384)]), flush=True)
def greedy(curve, total, lo=128, hi=1024, step=32):
    alloc = {i: lo for i in curve}
    left = total - lo * len(curve)
    gi = lambda b: budgets.index(b)
    while left >= step:
        best = max((i for i in curve if alloc[i] + step <= hi), key=lambda i: curve[i][gi(alloc[i])] - curve[i][gi(alloc[i] + step)])
        alloc[best] += step; left -= step
    return alloc
def build(alloc):
    mdl = copy.deepcopy(model)
    for i, L in enumerate(mdl.model.layers):
        x, y, order = data[i]; kb = alloc[i]; mlp = L.mlp
        with torch.no_grad():
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            idx = order[:kb]; z = h[:, idx]
            W0 = mlp.down_proj.weight[:, idx].T; G = z.T @ z; lam = 1e-3 * G.diagonal().mean()
            W = torch.linalg.solve(G + lam * torch.eye(kb), z.T @ y + lam * W0)
            g = torch.nn.Linear(576, kb, bias=False); g.weight.copy_(mlp.gate_proj.weight[idx])
            u = torch.nn.Linear(576, kb, bias=False); u.weight.copy_(mlp.up_proj.weight[idx])
            d = torch.nn.Linear(kb, 576, bias=False); d.weight.copy_(W.T)
            mlp.gate_proj, mlp.up_proj, mlp.down_proj = g, u, d
    return mdl
out = {"dense": ppl(model)}
print("dense", out["dense"], flush=True)
L = len(layers)
for frac in (384, 768):
    allocs = {"uniform": {i: frac for i in range(L)}}
    for key in ("rel", "norm"):
        allocs[key] = greedy(curves[key], frac * L, lo=frac // 3, hi=min(1536, frac * 3))
    allocs["norm-no-last"] = greedy({i: c for i, c in curves["norm"].items()}, frac * L, lo=frac // 3, hi=min(1536, int(frac * 1.5)))
    for name, a in allocs.items():
        p = ppl(build(a)); out[f"{frac}-{name}"] = {"ppl": p, "alloc": [a[i] for i in range(L)]}
        print(frac, name, round(p, 3), [a[i] for i in range(L)], flush=True)
json.dump({"budgets": budgets, "curves": curves, "results": out}, open(ROOT / "benchmarks/results/allocation_proxies.json", "w"))
