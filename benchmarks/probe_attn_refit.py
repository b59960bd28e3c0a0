"""Prototype (not kept in moefy): before each layer's FFN is converted, refit its attention o_proj by
ridge least squares on the converted stream's o_proj inputs, towards the dense model's o_proj
outputs plus ATTN_BETA x the drift of the stream entering the layer (needs --drift-correction);
the held-out choice of the ridge strength as moefy's W_down refit.  Runs bench_calib_size.py
with that patch:

    ATTN_BETA=0.5 OMP_NUM_THREADS=2 python benchmarks/probe_attn_refit.py --layout shared50 --sizes 16384 \
        --extra drift_correction=0.5 shared_by=obs --tag=-drift0.5-obs-attn0.5
"""
import os, sys
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import moefy.convert as C
from moefy.config import RIDGE_GAMMAS

BETA = float(os.environ.get("ATTN_BETA", "0.5"))
orig_convert = C._convert_layer
orig_advance = C.advance_dense_stream
STATE = {}

def _collect(layer, mod, batches, kwargs, device, want):
    got = []
    def pre(_m, args):
        if want == "in":
            got.append(args[0].detach().float().reshape(-1, args[0].shape[-1]))
    def post(_m, args, out):
        if want == "out":
            got.append(out.detach().float().reshape(-1, out.shape[-1]))
    h1 = mod.register_forward_pre_hook(pre); h2 = mod.register_forward_hook(post)
    try:
        with torch.no_grad():
            for x in batches:
                layer(x.to(device), **kwargs)
    finally:
        h1.remove(); h2.remove()
    return torch.cat(got)

@torch.no_grad()
def refit_o(layer, i, store, kwargs, device, dense, cfg):
    o = layer.self_attn.o_proj
    w0 = o.weight.detach().float().clone()
    conv_b = [store.get(b) for b in range(len(store))]
    dense_b = [dense.get(b) for b in range(len(dense))]
    c = _collect(layer, o, conv_b, kwargs, device, "in")
    t = _collect(layer, o, dense_b, kwargs, device, "out")
    if BETA > 0:
        t = t + BETA * torch.cat([(d.float() - s.float()).reshape(-1, d.shape[-1]) for d, s in zip(dense_b, conv_b)])
    n_seq = sum(int(x.shape[0]) for x in conv_b); seq = conv_b[0].shape[1]
    n_val = max(1, int(round(n_seq * cfg.val_fraction)))
    cut = (n_seq - n_val) * seq
    ctr, cva, ttr, tva = c[:cut], c[cut:], t[:cut], t[cut:]
    def err(w):
        return float((cva @ w.T - tva).pow(2).sum() / tva.pow(2).sum())
    g = ctr.T @ ctr; ct = ctr.T @ ttr
    best, bw, bg = err(w0), w0, None
    e0 = best
    sc = g.diagonal().mean()
    for gm in RIDGE_GAMMAS:
        lam = gm * sc
        w = torch.linalg.solve(g + lam * torch.eye(g.shape[0]), ct + lam * w0.T).T
        e = err(w)
        if e < best:
            best, bw, bg = e, w, gm
    o.weight.copy_(bw.to(o.weight.dtype))
    STATE[i] = w0.to(o.weight.dtype)
    print(f"attn refit layer {i}: held-out rel err {e0:.4f} -> {best:.4f} (gamma {bg})", flush=True)

def patched_convert(layer, i, store, kwargs, adapter, config, cfg, device, n_converted, select=None, dense=None, alpha=0.0):
    if dense is not None:
        refit_o(layer, i, store, kwargs, device, dense, cfg)
    return orig_convert(layer, i, store, kwargs, adapter, config, cfg, device, n_converted, select, dense, alpha)

def patched_advance(layer, dense, kwargs, device, moe_outputs=None):
    o = layer.self_attn.o_proj
    i = getattr(layer.self_attn, "layer_idx", None)
    if i in STATE:
        new = o.weight.detach().clone(); o.weight.data.copy_(STATE[i])
        try:
            return orig_advance(layer, dense, kwargs, device, moe_outputs)
        finally:
            o.weight.data.copy_(new)
    return orig_advance(layer, dense, kwargs, device, moe_outputs)

C._convert_layer = patched_convert
C.advance_dense_stream = patched_advance
import bench_calib_size
bench_calib_size.main()
