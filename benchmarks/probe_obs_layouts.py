"""Layer-level: MoE layouts at one active count, shared neurons by importance against --shared-by obs.

moefy's own pipeline per (layer, layout, rule): initial split (DOT-MoE, 40 steps), fit_layer with
the ridge refit; dense FFN inputs of the first 16,384 tokens of WikiText-2 valid, the last 1/8 of
the sequences held out; relative held-out error.  ``prune:E:k`` is structured pruning to k/E.

    OMP_NUM_THREADS=2 python benchmarks/probe_obs_layouts.py 15 \
        20:4:576,40:8:576,80:16:576,18:2:672,24:8:384,48:16:384,prune:8:4 importance,obs \
        benchmarks/results/obs_layouts_L15_50.json
"""
import sys, time, json, torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from bench_reconstruction import capture, oracle_error
from moefy.config import ConvertConfig
from moefy.convert import _split_train_val, initial_split, make_layer, neuron_order
from moefy.layerwise import fit_layer
from moefy.splits import activation_sample
layers = [int(a) for a in sys.argv[1].split(",")]
specs = sys.argv[2].split(",")
rules = sys.argv[3].split(",")
model, adapter, io, n = capture("smollm2-135m", "../shared/data/wikitext2/wiki.valid.tokens", 16384, 512, layers)
out = []
for i in layers:
    x, y = io[i]
    mlp = adapter.layers(model)[i].mlp
    ffn = adapter.ffn_weights(mlp); act = getattr(mlp, adapter.act_attr)
    xt, yt, xv, yv = _split_train_val(x, y, 0.125)
    order = neuron_order(mlp, adapter, xt, yt)
    h = activation_sample(act(xt @ ffn.gate.T) * (xt @ ffn.up.T), seed=i)
    for spec in specs:
        p = spec.split(":")
        method = "prune" if p[0] == "prune" else "dot"
        e, k, s = (8, 2, 0) if method == "prune" else (int(p[0]), int(p[1]), int(p[2]))
        for rule in rules:
            cfg = ConvertConfig(method=method, n_experts=e, top_k=k, n_shared=s, shared_by=rule, steps=40)
            if method == "prune":
                cfg = ConvertConfig(method="prune", n_experts=int(p[1]), top_k=int(p[2]), shared_by=rule)
            t = time.time()
            split = initial_split(method, cfg.init, ffn, h, cfg, i, order)
            dot = make_layer(mlp, adapter, model.config, split, cfg)
            rep = fit_layer(dot, xt, yt, xv, yv, cfg, i)
            orc = oracle_error(dot, xv, yv) if method != "prune" else float("nan")
            row = dict(layer=i, spec=spec, rule=rule, routed=rep.error_routed, ridge=rep.error_final, oracle=orc, sec=time.time() - t)
            out.append(row)
            print(f"L{i} {spec:>12} {rule:<10} routed {rep.error_routed:.4f} ridge {rep.error_final:.4f} oracle {orc:.4f} {time.time()-t:.0f}s", flush=True)
json.dump(out, open(sys.argv[4], "w"), indent=1)
