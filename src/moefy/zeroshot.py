"""Zero-shot evaluation through lm-evaluation-harness (lm-eval 0.4), the field's evaluator.

``moefy eval --tasks`` and ``moefy compare --tasks`` score with lm-eval itself: the model (a dense
Hugging Face model or a moefy checkpoint, already loaded) is wrapped in lm-eval's ``HFLM`` and run
through ``lm_eval.simple_evaluate``, so prompts, tokenisation, batching, log-likelihoods, ``acc``,
``acc_norm`` and their standard errors are lm-eval's own.

Task names resolve in this order:

1. moefy's offline copies (``moefy.task_data.LOCAL_TASKS``: arc_easy, arc_challenge, piqa,
   hellaswag, winogrande, openbookqa, boolq, sciq, social_iqa) under ``data_root``: lm-eval
   cannot read their formats, so moefy converts them to lm-eval documents and writes task configs
   that include lm-eval's own definitions and read the local files (no network);
2. task configs in ``task_dirs`` (lm-eval YAMLs, e.g. MMLU over local parquet files with
   ``dataset_path: parquet`` and ``data_files``), registered through lm-eval's ``TaskManager``;
3. any task lm-eval ships (MMLU, LAMBADA, ...), whose data ``datasets`` loads from its cache or
   the hub: available when its data are reachable.

Each task's result is ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", ...}`` (every
metric lm-eval reports, without its ``,none`` filter suffix), the JSON ``moefy compare`` reads.
WinoGrande is scored by lm-eval's partial evaluation, where both choices share one continuation,
so length normalisation cannot change the winner: lm-eval reports only ``acc``, and ``acc_norm``
is that same number.

moefy has no scorer of its own any more: ``moefy.task_data`` (reading the offline copies) is the
only part lm-eval cannot do.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .task_data import LOCAL_TASKS, default_data_root, existing_task_path, write_task_config

__all__ = ["LOCAL_TASKS", "default_data_root", "evaluate_tasks", "lm_eval_version"]

# acc_norm equals acc by construction (one shared continuation per item): see the module docstring
_ACC_NORM_IS_ACC = {"winogrande"}


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as exc:  # a broken install: lm-eval is a moefy dependency
        raise ValueError(f"lm-eval is not importable ({exc}); install it with pip install 'lm-eval>=0.4,<0.5'") from None
    return lm_eval


def lm_eval_version() -> str:
    return str(getattr(_lm_eval(), "__version__", "?"))


def _max_length(model: Any, tokenizer: Any) -> int:
    """The model's context length (a moefy checkpoint keeps it in ``base_config``)."""
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if v is None and isinstance(getattr(cfg, "base_config", None), dict):
            v = cfg.base_config.get(attr)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    return v if isinstance(v, int) and 0 < v < 1_000_000 else 2048


def _split_names(tasks: Iterable[str] | str) -> list[str]:
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [t.strip() for t in tasks]
    return [t for t in names if t]


def _metrics(res: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's ``{"acc,none": .., "acc_stderr,none": ..}`` as ``{"acc": .., "acc_stderr": ..}``."""
    out: dict[str, Any] = {}
    for key, value in res.items():
        if "," not in key or not isinstance(value, (int, float)):
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric}_{filt}"
        out[name] = float(value) if isinstance(value, (int, float)) else value
    return out


def _n_samples(out: dict[str, Any], name: str) -> int:
    n = out.get("n-samples", {})
    if name in n:
        return int(n[name]["effective"])
    subtasks = out.get("group_subtasks", {}).get(name, [])  # a group (e.g. mmlu): its tasks' items
    return sum(_n_samples(out, t) for t in subtasks)


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Iterable[str] | str,
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
    task_dirs: Sequence[str | os.PathLike] = (),
    details: bool = False,
) -> dict[str, dict[str, Any]]:
    """Zero-shot scores of ``model`` on each task: ``{task: {"acc", "acc_stderr", "acc_norm",
    "acc_norm_stderr", "n", ...}}``, scored by lm-eval.

    ``tasks``: names (or one comma-separated string); every name and local data file is checked
    before the model runs.  ``limit``: the first N items of each task, in file order.  With
    ``details``, each task also gets ``"items"``: per item (by ``doc_id``) lm-eval's requests
    ``[context, continuation]`` and the log-likelihood of each choice.
    """
    names = _split_names(tasks)
    if not names:
        raise ValueError(f"no tasks given; moefy's offline tasks: {', '.join(LOCAL_TASKS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    local = [n for n in names if n in LOCAL_TASKS]
    for name in local:
        existing_task_path(name, data_root)
    dirs = [str(Path(d)) for d in task_dirs]
    for d in dirs:
        if not Path(d).is_dir():
            raise ValueError(f"task config folder not found: {d}")
    lm_eval = _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    lm_tasks = Path(lm_eval.__file__).parent / "tasks"
    with tempfile.TemporaryDirectory(prefix="moefy-tasks-") as tmp:
        for name in local:
            write_task_config(name, Path(tmp), lm_tasks, data_root, limit)
        others = [n for n in names if n not in LOCAL_TASKS]
        manager = TaskManager(include_path=[tmp, *dirs], include_defaults=False)
        if any(n not in manager.all_tasks for n in others):  # lm-eval's own tasks: index them (slow, ~15 s)
            manager = TaskManager(include_path=[tmp, *dirs], include_defaults=True)
        unknown = [n for n in others if n not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}: neither moefy's offline copies ({', '.join(LOCAL_TASKS)}) "
                             "nor a task lm-eval knows (give its config folder with --task-dir)")
        was_training = bool(getattr(model, "training", False))
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, backend="causal",
                  max_length=max_length or _max_length(model, tokenizer))
        try:
            out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit if others else None,
                                  bootstrap_iters=1000,  # "mean" metrics get lm-eval's closed-form stderr
                                  log_samples=details)
        except Exception as exc:  # noqa: BLE001 - a task whose data cannot be had: one line
            raise ValueError(f"lm-eval could not run {', '.join(names)}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
        finally:
            if was_training and hasattr(model, "train"):
                model.train()
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        r = _metrics(out["results"][name])
        if name in _ACC_NORM_IS_ACC and "acc_norm" not in r:
            r["acc_norm"], r["acc_norm_stderr"] = r["acc"], r.get("acc_stderr", math.nan)
        r["n"] = _n_samples(out, name)
        if details:
            r["items"] = [{"doc_id": x["doc_id"], "requests": [list(a) for a in x["arguments"]],
                           "lls": [float(resp[0]) for resp in x["filtered_resps"]]}
                          for x in sorted(out["samples"].get(name, []), key=lambda x: x["doc_id"])]
        results[name] = r
    return results
