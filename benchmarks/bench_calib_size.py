"""Does the layer-wise stage overfit its calibration text?  PPL on three texts per calibration size.

For one layout of SmolLM2-135M and each ``--calib-tokens`` size, a layer-wise conversion
(``moefy convert`` with the given extra settings) on the first N tokens of WikiText-2 valid
(word-level), then perplexity at 512 tokens per window of

- the first 16 calibration sequences (text the conversion fitted),
- 16 sequences of WikiText-2 valid past every calibration size run (text it never saw, same
  distribution and format as the calibration text),
- the first ``--test-windows`` 1024-token windows of WikiText-2 raw test (the reported metric),

for the dense model and for each conversion.  The gap between the first two columns is the
overfitting; the third is what users see.  Conversions are kept under ``--out`` (gitignored) and
reused.  Prints a table, writes JSON.

    OMP_NUM_THREADS=2 python benchmarks/bench_calib_size.py --layout e8k2 --sizes 16384,65536
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "wikitext2"
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_recovery import LAYOUTS  # noqa: E402

UNSEEN_FROM = 400  # unseen valid text: sequences 400-415 of 512 tokens (from token 204,400: past 131k calibration tokens)


@torch.no_grad()
def ppl(model: torch.nn.Module, rows: torch.Tensor, batch: int = 4) -> float:
    nll, n = 0.0, 0
    for w in rows.split(batch):
        logits = model(input_ids=w, use_cache=False).logits.float()
        nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                       reduction="sum"))
        n += w[:, 1:].numel()
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="e8k2")
    ap.add_argument("--sizes", default="16384,65536", help="comma-separated calibration token counts")
    ap.add_argument("--extra", nargs="*", default=[], help="ConvertConfig key=value settings (YAML values)")
    ap.add_argument("--test-windows", type=int, default=16)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "calib_size")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--calib-text", choices=("valid", "valid-no-unk", "data-free"), default="valid",
                    help="what the conversion fits: WikiText-2 valid (word-level); the same with every `<unk>` "
                         "removed (written under the system temp dir, never into the project); or text sampled "
                         "from the dense model (moefy's data-free calibration)")
    args = ap.parse_args()
    valid, test = SHARED / "wiki.valid.tokens", SHARED / "wiki.test.raw"
    if not valid.is_file() or not test.is_file():
        sys.exit(f"needs {valid} and {test} (../shared beside the project)")
    import yaml
    from transformers import AutoModelForCausalLM

    import moefy  # noqa: F401
    from moefy.calibration import from_files
    from moefy.config import ConvertConfig
    from moefy.evaluate import load_eval_ids
    from moefy.models import load
    from moefy.runner import run_convert
    from moefy.training.data import PackedData

    calib_specs = [str(valid)]
    if args.calib_text == "valid-no-unk":
        import tempfile

        derived = Path(tempfile.gettempdir()) / "moefy-bench" / "wiki.valid.no-unk.txt"
        derived.parent.mkdir(parents=True, exist_ok=True)
        derived.write_text(valid.read_text(encoding="utf-8").replace(" <unk>", ""), encoding="utf-8")
        calib_specs = [str(derived)]
    elif args.calib_text == "data-free":
        calib_specs = []
    E, k, shared, shared_by = LAYOUTS[args.layout]
    settings = {kv.partition("=")[0]: yaml.safe_load(kv.partition("=")[2]) for kv in args.extra}
    sizes = [int(s) for s in args.sizes.split(",")]
    dense = load(args.model)
    tok = dense.tokenizer
    calib_rows = from_files(tok, [str(valid)], 16 * 512, 512).ids
    unseen = torch.stack(list(itertools.islice(PackedData(tok, [str(valid)], 512)._raw_rows(), UNSEEN_FROM, UNSEEN_FROM + 16)))
    assert UNSEEN_FROM * 511 > max(sizes) + 512, "unseen valid rows must lie past every calibration size"
    test_rows = load_eval_ids(tok, test)[: args.test_windows * 1024].view(args.test_windows, 1024)
    texts = {"calibration": calib_rows, "unseen_valid": unseen, "test": test_rows}

    def score(m: torch.nn.Module) -> dict[str, float]:
        return {name: ppl(m, rows, 4 if rows.shape[1] == 512 else 2) for name, rows in texts.items()}

    if args.calib_text != "valid" and not args.tag:
        args.tag = f"-{args.calib_text}"
    rows: list[dict] = [{"model": "dense", "calib_tokens": 0, **score(dense.model.eval())}]
    print(rows[-1], flush=True)
    del dense
    for n in sizes:
        path = args.out / f"{args.layout}-{n}{args.tag}"
        t0 = time.time()
        if not (path / "moefy.json").is_file():
            cfg = ConvertConfig(**{"n_experts": E, "top_k": k, "n_shared": shared, "shared_by": shared_by, "calib_tokens": n,
                                   "seq_len": 512, **settings})
            run_convert(args.model, path, cfg, calib_specs, overwrite=True, log=lambda m: print("convert:", m, flush=True))
            convert_s = round(time.time() - t0, 1)
        else:
            convert_s = json.loads((path / "moefy.json").read_text()).get("wall_seconds")
        m = AutoModelForCausalLM.from_pretrained(path).eval()
        rows.append({"model": f"{args.layout} {n}", "calib_tokens": n, "convert_seconds": convert_s, **score(m)})
        print(rows[-1], flush=True)
        del m
    d = rows[0]
    print(f"\n{args.layout}{args.tag} ({' '.join(args.extra) or 'defaults'}); PPL, x dense in brackets")
    print("| model | calib tokens | calibration text (16 x 512) | unseen valid (16 x 512) | "
          f"WikiText-2 raw test ({args.test_windows} x 1024) | convert (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[c]:.2f} ({r[c] / d[c]:.2f}x)" for c in texts]
        print(f"| {r['model']} | {r['calib_tokens']} | {' | '.join(cells)} | {r.get('convert_seconds', '')} |")
    out = args.json or args.out / f"{args.layout}{args.tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"layout": args.layout, "extra": args.extra, "calib_text": args.calib_text, "rows": rows, "threads": torch.get_num_threads(),
                               "unseen_valid_from_sequence": UNSEEN_FROM, "command": "python benchmarks/bench_calib_size.py "
                               + " ".join(sys.argv[1:])}, indent=1))
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
