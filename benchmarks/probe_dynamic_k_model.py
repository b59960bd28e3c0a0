"""Model-level prototype (not in moefy): per-token dynamic k on a converted checkpoint.

Each MoE layer's top-k is replaced by a global threshold on an un-centred least-squares router
(bias included) onto the log of each expert's output norm, fitted on the first ``N`` tokens of
WikiText-2 valid seen through the converted model, the threshold set so that the mean number of
experts per token on those tokens is the layer's k (at most ``cap x k`` per token); no weight refit.
PPL on the first 16 windows of 1024 tokens of WikiText-2 raw test, before and after.

    OMP_NUM_THREADS=2 python benchmarks/probe_dynamic_k_model.py CKPT CAP N OUT.json
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_fine_routers import calibrate, ridge, threshold_mask  # noqa: E402

from moefy.calibration import from_files
from moefy.evaluate import _moe_mlps, load_eval_ids, perplexity
from moefy.models import load


def main() -> None:
    ckpt, cap_mult, ntok, out_path = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
    torch.manual_seed(0)
    loaded = load(ckpt)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    ids = load_eval_ids(tok, "../shared/data/wikitext2/wiki.test.raw")
    base = perplexity(model, ids, 1024, max_windows=16)
    calib = from_files(tok, ["../shared/data/wikitext2/wiki.valid.tokens"], ntok, 512).ids
    mlps = _moe_mlps(model)
    xs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(mlps))}
    hooks = [m.register_forward_pre_hook(lambda mod, a, i=i: xs[i].append(a[0].reshape(-1, a[0].shape[-1])))
             for i, m in enumerate(mlps)]
    with torch.no_grad():
        for b in range(0, calib.shape[0], 4):
            model(input_ids=calib[b:b + 4], use_cache=False)
    for hk in hooks:
        hk.remove()
    t0 = time.time()
    for i, m in enumerate(mlps):
        x = torch.cat(xs[i])
        xs[i] = []
        with torch.no_grad():
            h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
            W = m.down_proj.weight
            tgt = torch.log(torch.stack([(h[:, m.offsets[e]:m.offsets[e + 1]] @ W[:, m.offsets[e]:m.offsets[e + 1]].T).norm(dim=-1)
                                         for e in range(m.n_experts)], 1) + 1e-6)
            sol = ridge(x, tgt, True)
            wr, br = sol[:-1].T.contiguous(), sol[-1].contiguous()
            k = int(m.top_k)
            cap = int(min(m.n_experts, round(cap_mult * k)))
            thr = calibrate(x @ wr.T + br, k, cap)

        def fwd(hs: torch.Tensor, m=m, wr=wr, br=br, thr=thr, cap=cap) -> torch.Tensor:
            shp = hs.shape
            x = hs.reshape(-1, shp[-1])
            keep = threshold_mask(x @ wr.T + br, thr, cap).bool()
            if m.count_active:
                m.active_pairs += int(keep.sum())
                m.tokens_seen += x.shape[0]
            h = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
            return m.down_proj(h * m.neuron_mask(keep.to(h.dtype))).reshape(shp)

        m.forward = fwd
    fit_s = time.time() - t0
    dyn = perplexity(model, ids, 1024, max_windows=16)
    res = {"checkpoint": ckpt, "cap_x_k": cap_mult, "calib_tokens": ntok, "fit_seconds": fit_s,
           "top_k_ppl": base["ppl"], "dynamic_ppl": dyn["ppl"], "dynamic_mean_active_experts": dyn["mean_active_experts"],
           "dynamic_active_per_layer": dyn["active_experts_per_layer"]}
    print(json.dumps({k: v for k, v in res.items() if k != "dynamic_active_per_layer"}))
    out_path.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
