"""Layer-level: the shared/kept neurons by importance against greedy structured OBS
(moefy.splits.obs_order) at several block sizes, each followed by a ridge refit of W_down
(held-out relative error; dense FFN inputs of the first 16,384 tokens of WikiText-2 valid, the
last 1/8 of the tokens held out).

    OMP_NUM_THREADS=2 python benchmarks/probe_obs_blocks.py 15,0 768,384 1,8,32
"""
import sys, time, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_reconstruction import capture
from moefy.splits import obs_order
layers = [int(a) for a in sys.argv[1].split(",")]
keeps = [int(a) for a in sys.argv[2].split(",")]
blocks = [int(a) for a in sys.argv[3].split(",")]
model, adapter, io, n = capture("smollm2-135m", "../shared/data/wikitext2/wiki.valid.tokens", 16384, 512, layers)
mods = adapter.layers(model)
def rel(a, b): return float((a - b).pow(2).sum() / b.pow(2).sum())
def ridge(htr, ytr, hva, yva, w0):
    g = htr.T @ htr; zty = htr.T @ ytr
    best = (rel(hva @ w0, yva), None)
    sc = g.diagonal().mean()
    for gm in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):
        lam = gm * sc
        w = torch.linalg.solve(g + lam * torch.eye(g.shape[0]), zty + lam * w0)
        e = rel(hva @ w, yva)
        if e < best[0]: best = (e, gm)
    return best
with torch.no_grad():
  for li in layers:
    x, y = io[li][0], io[li][1]
    x = x.reshape(-1, x.shape[-1]).float(); y = y.reshape(-1, y.shape[-1]).float()
    mlp = mods[li].mlp
    wg, wu, wd = mlp.gate_proj.weight.float(), mlp.up_proj.weight.float(), mlp.down_proj.weight.float()
    h = torch.nn.functional.silu(x @ wg.T) * (x @ wu.T)
    ntr = int(h.shape[0] * 7 / 8)
    htr, hva, ytr, yva = h[:ntr], h[ntr:], y[:ntr], y[ntr:]
    imp = htr.abs().mean(0) * wd.norm(dim=0)
    G, C = htr.T @ htr, htr.T @ ytr
    for m in keeps:
        keep = imp.topk(m).indices
        print(f"L{li} keep {m}: importance {ridge(htr[:, keep], ytr, hva[:, keep], yva, wd.T[keep])[0]:.4f}", flush=True)
        for b in blocks:
            t = time.time()
            order = obs_order(G, C, keep=m, block=b)
            k2 = order[:m]
            print(f"   obs block {b}: {ridge(htr[:, k2], ytr, hva[:, k2], yva, wd.T[k2])[0]:.4f}  {time.time()-t:.1f}s", flush=True)
        t = time.time(); order = obs_order(G, C, keep=0, block=16); k3 = order[:m]
        print(f"   obs full order block 16 prefix: {ridge(htr[:, k3], ytr, hva[:, k3], yva, wd.T[k3])[0]:.4f}  {time.time()-t:.1f}s", flush=True)
