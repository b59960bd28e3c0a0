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

__all__ = ["CHANCE", "LOCAL_TASKS", "check_tasks", "default_data_root", "evaluate_tasks", "lm_eval_version", "retention"]

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


def check_tasks(
    tasks: Iterable[str] | str, data_root: str | os.PathLike | None = None, limit: int | None = None,
    task_dirs: Sequence[str | os.PathLike] = (),
) -> list[str]:
    """The task names, checked without a model: moefy's offline copies must have their data
    files, task folders must exist (other names are checked by lm-eval when they run).  Raises
    ``ValueError`` with one line; ``moefy eval`` calls it before loading any model."""
    names = _split_names(tasks)
    if not names:
        raise ValueError(f"no tasks given; moefy's offline tasks: {', '.join(LOCAL_TASKS)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    for name in names:
        if name in LOCAL_TASKS:
            existing_task_path(name, data_root)
    for d in task_dirs:
        if not Path(d).is_dir():
            raise ValueError(f"task config folder not found: {d}")
    others = [n for n in names if n not in LOCAL_TASKS]
    if others:  # lm-eval's own tasks and those in task_dirs: index them (about 15 s)
        _lm_eval()
        from lm_eval.tasks import TaskManager

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        known = TaskManager(include_path=[str(d) for d in task_dirs] or None, include_defaults=True).all_tasks
        unknown = [n for n in others if n not in known]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}: neither moefy's offline copies ({', '.join(LOCAL_TASKS)}) "
                             "nor a task lm-eval knows (give its config folder with --task-dir)")
    return names


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
    names = check_tasks(tasks, data_root, limit, task_dirs)
    local = [n for n in names if n in LOCAL_TASKS]
    dirs = [str(Path(d)) for d in task_dirs]
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
                                  log_samples=True)  # per-item scores: paired standard errors (retention)
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
        samples = sorted(out.get("samples", {}).get(name, []), key=lambda x: x["doc_id"])
        per_item = {m: [float(x[m]) for x in samples] for m in ("acc", "acc_norm") if samples and m in samples[0]}
        if name in _ACC_NORM_IS_ACC and "acc" in per_item:
            per_item.setdefault("acc_norm", per_item["acc"])
        if per_item:
            r["per_item"] = per_item
        if details:
            r["items"] = [{"doc_id": x["doc_id"], "requests": [list(a) for a in x["arguments"]],
                           "lls": [float(resp[0]) for resp in x["filtered_resps"]]}
                          for x in sorted(out["samples"].get(name, []), key=lambda x: x["doc_id"])]
        results[name] = r
    return results


# ------------------------------------------------------------------------------------------
# what a converted model keeps of its reference's zero-shot ability
# ------------------------------------------------------------------------------------------

# Accuracy of a uniform guess on each task moefy knows (the number of choices per item is fixed
# for these); lm-eval tasks not listed here are reported but left out of the retention.
CHANCE: dict[str, float] = {
    "arc_easy": 0.25, "arc_challenge": 0.25, "piqa": 0.5, "hellaswag": 0.25, "winogrande": 0.5,
    "openbookqa": 0.25, "boolq": 0.5, "sciq": 0.25, "social_iqa": 1 / 3, "mmlu": 0.25,
}


def retention(
    reference: dict[str, dict[str, Any]], model: dict[str, dict[str, Any]], metric: str = "acc_norm",
    min_sigma: float = 2.0,
) -> dict[str, Any]:
    """How much of ``reference``'s above-chance accuracy ``model`` keeps, over the tasks both
    were scored on: ``sum_t (model_t - chance_t) / sum_t (reference_t - chance_t)``, the measure
    the DOT-MoE paper's headline is (66.6 of 76.6 over a 37.5 chance average: 74%).

    A task counts only where the reference is above chance by more than ``min_sigma`` of its
    standard error, since a task the reference cannot do cannot show what a model kept of it;
    tasks without a known chance level are left out too.  Both kinds are listed with the reason.
    ``stderr`` is the delta method's over the tasks; where both results carry per-item scores
    (``per_item``, which :func:`evaluate_tasks` records) of the same items, the two models'
    covariance is taken into account (``paired``), else they are treated as independent, which
    overstates it.  Returns ``{"retention", "stderr", "paired", "tasks", "excluded", "metric"}``
    (``retention`` is ``None`` when no task counts)."""
    used: list[str] = []
    excluded: dict[str, str] = {}
    num = den = var_num = var_den = cov = 0.0
    paired = True
    for task, ref in reference.items():
        if task not in model:
            continue
        m = model[task]
        if task not in CHANCE:
            excluded[task] = "no known chance level"
            continue
        if not isinstance(ref.get(metric), (int, float)) or not isinstance(m.get(metric), (int, float)):
            excluded[task] = f"no {metric}"
            continue
        c = CHANCE[task]
        ref_se = float(ref.get(f"{metric}_stderr") or 0.0)
        ref_se = 0.0 if math.isnan(ref_se) else ref_se
        if ref[metric] - c <= min_sigma * ref_se or ref[metric] <= c:
            excluded[task] = f"reference {ref[metric]:.3f} is within {min_sigma:g} stderr of chance {c:.3f}"
            continue
        m_se = float(m.get(f"{metric}_stderr") or 0.0)
        m_se = 0.0 if math.isnan(m_se) else m_se
        used.append(task)
        num += m[metric] - c
        den += ref[metric] - c
        xs, ys = (m.get("per_item") or {}).get(metric), (ref.get("per_item") or {}).get(metric)
        if xs and ys and len(xs) == len(ys) > 1:  # the same items scored by both: variances and covariance from them
            n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
            var_num += sum((x - mx) ** 2 for x in xs) / (n - 1) / n
            var_den += sum((y - my) ** 2 for y in ys) / (n - 1) / n
            cov += sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / (n - 1) / n
        else:
            paired = False
            var_num += m_se ** 2
            var_den += ref_se ** 2
    if not used:
        return {"retention": None, "stderr": None, "tasks": [], "excluded": excluded, "metric": metric, "paired": False}
    r = num / den
    cov = cov if paired else 0.0
    se = math.sqrt(max(var_num - 2 * r * cov + r * r * var_den, 0.0)) / den
    return {"retention": r, "stderr": se, "tasks": used, "excluded": excluded, "metric": metric, "paired": paired}
