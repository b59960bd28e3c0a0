"""Perplexity over non-overlapping windows (the usual WikiText-2 protocol).

The text is tokenized once (with the tokenizer's own special tokens, i.e. one BOS at the
start where the model uses one) and cut into ``len // seq_len`` windows of ``seq_len``
tokens; every token after the first of each window is predicted.
``ppl = exp(total NLL / predicted tokens)``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationDataError


def check_eval_text(path: str | Path) -> Path:
    """An evaluation text file that exists and holds text (checked before any model loads)."""
    p = Path(path)
    if not p.is_file():
        raise CalibrationDataError(f"evaluation text not found: {p}")
    if p.stat().st_size == 0:
        raise CalibrationDataError(f"evaluation text is empty: {p}")
    return p


def load_eval_ids(tokenizer: Any, path: str | Path) -> torch.Tensor:
    p = check_eval_text(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CalibrationDataError(f"cannot read {p} as UTF-8 text: {exc}") from None
    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def _moe_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The routed MoE FFNs of a moefy model, in layer order (none for a dense model)."""
    return [m for m in model.modules() if type(m).__name__ == "MoefyMLP" and getattr(m, "n_experts", 0) > 0]


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seq_len: int = 1024,
    max_windows: int | None = None,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise CalibrationDataError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    nll = 0.0
    count = 0
    moe = _moe_mlps(model)
    for m in moe:  # measure the experts each token actually runs (LapSum: variable per token)
        m.count_active, m.active_pairs, m.tokens_seen = True, 0, 0
    t0 = time.time()
    for s in range(0, n_windows, batch_size):
        batch = windows[s : s + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        nll += float(loss)
        count += batch[:, 1:].numel()
        if progress is not None:
            progress(min(s + batch_size, n_windows), n_windows)
    out: dict[str, Any] = {
        "ppl": math.exp(nll / count),
        "nll": nll / count,
        "tokens": count,
        "windows": n_windows,
        "seq_len": seq_len,
        "seconds": time.time() - t0,
    }
    if moe:
        per_layer = [m.active_pairs / max(m.tokens_seen, 1) for m in moe]
        out["active_experts_per_layer"] = [round(v, 4) for v in per_layer]
        out["mean_active_experts"] = sum(per_layer) / len(per_layer)
        for m in moe:
            m.count_active = False
    return out


# ----------------------------------------------------------------------------- whole models
def evaluate_loaded(
    model: torch.nn.Module, tokenizer: Any, ppl: list[Path] | tuple[Path, ...] = (), seq_len: int = 1024,
    max_windows: int | None = None, tasks: list[str] | tuple[str, ...] = (), limit: int | None = None,
    data_root: Path | None = None, batch_size: int = 16, task_dirs: list[Path] | tuple[Path, ...] = (),
    progress: Callable[[str, int, int], None] | None = None, name: str = "model",
) -> dict[str, Any]:
    """A loaded model's perplexity on each file (``"perplexity": {file: {...}}``; the first
    file's figures also at the top level) and zero-shot scores (``"tasks"``, by lm-eval)."""
    result: dict[str, Any] = {}
    for f in ppl:
        ids = load_eval_ids(tokenizer, f)
        r = perplexity(model, ids, seq_len=seq_len, max_windows=max_windows,
                       progress=None if progress is None else (lambda d, t, f=f: progress(f"perplexity {name} {Path(f).name}", d, t)))
        r["ppl_file"] = str(f)
        result.setdefault("perplexity", {})[str(f)] = r
        if len(result["perplexity"]) == 1:
            result.update(r)
    if tasks:
        from .zeroshot import evaluate_tasks, lm_eval_version

        result["tasks"] = evaluate_tasks(model, tokenizer, list(tasks), data_root=data_root, limit=limit,
                                         batch_size=batch_size, task_dirs=list(task_dirs))
        result["tasks_scored_by"] = f"lm-eval {lm_eval_version()}"
    return result


def evaluate_model(
    spec: str, src: Any = None, ppl: list[Path] | tuple[Path, ...] = (), seq_len: int = 1024,
    max_windows: int | None = None, tasks: list[str] | tuple[str, ...] = (), limit: int | None = None,
    data_root: Path | None = None, batch_size: int = 16, dtype: str = "fp32",
    task_dirs: list[Path] | tuple[Path, ...] = (), progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`evaluate_loaded` of the model ``spec`` names (as ``moefy eval`` takes it), loaded
    whole in ``dtype`` (``auto``: the checkpoint's own) after a memory check."""
    from .memory import DTYPES, check_whole_model
    from .models import checkpoint_dtype, load, locate, parameter_count

    src = src if src is not None else locate(spec)
    torch_dtype = checkpoint_dtype(src) if dtype == "auto" else DTYPES[dtype]
    n_params = parameter_count(src)
    if n_params:
        check_whole_model(f"evaluating {spec}", int(n_params * torch_dtype.itemsize * 1.1),
                          "evaluate on a machine with more memory (or with --dtype bf16)", log=log)
    loaded = load(src, torch_dtype)
    result: dict[str, Any] = {"model": spec, "loaded_from": loaded.source}
    result.update(evaluate_loaded(loaded.model, loaded.tokenizer, ppl, seq_len, max_windows, tasks, limit, data_root,
                                  batch_size, task_dirs, progress, name=spec))
    return result


def add_relative(results: list[dict[str, Any]], metric: str = "acc_norm") -> None:
    """Each result's perplexities as multiples of the first result's (``x_ref``), and its
    zero-shot retention against it (:func:`moefy.zeroshot.retention`)."""
    from .zeroshot import retention

    ref = results[0]
    for r in results:
        for name, p in r.get("perplexity", {}).items():
            base = ref.get("perplexity", {}).get(name)
            if base:
                p["x_ref"] = p["ppl"] / base["ppl"]
        if ref.get("tasks") and r.get("tasks"):
            r["retention"] = retention(ref["tasks"], r["tasks"], metric)
