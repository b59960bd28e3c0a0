"""Zero-shot multiple-choice evaluation of causal LMs, scored the way lm-eval-harness scores them.

Every item is a context plus a few candidate continuations; a choice's score is the summed
log-likelihood of its continuation tokens given the context.  ``acc`` takes the arg-max score,
``acc_norm`` the arg-max of score / (number of characters in the choice text), as lm-eval does.

Task files are the copies under ``shared/data`` (see ``shared/README.md``):

* ``commonsense/*.test.json`` -- LLM-Adapters format: a JSON list of ``{instruction, input, output,
  answer}``; the question and the choices live in ``instruction`` (``Answer1: ...``,
  ``Solution1: ...``, ``Option1: ...``), the gold label in ``answer`` (``answer2``, ``solution1``,
  ``option2``, ``true``/``false``).
* ``hellaswag/hellaswag_val.txt`` -- six lines per item: context, gold index, four endings.

Prompts follow lm-eval-harness's task definitions (v0.4) as far as the data allows:

===============  ===============================================  ==============================
task             context                                          continuation(s)
===============  ===============================================  ==============================
arc_easy/_chall  ``Question: {question}\\nAnswer:``                ``" " + choice``
piqa             ``Question: {goal}\\nAnswer:``                    ``" " + solution``
openbookqa       ``{question_stem}``                              ``" " + choice``
sciq             ``Question: {question}\\nAnswer:`` (no support)   ``" " + choice``
social_iqa       ``Q: {context} {question}\\nA:``                  ``" " + answer``
boolq            ``Question: {question}?\\nAnswer:`` (no passage)  ``" no"`` / ``" yes"``
hellaswag        ``{activity}: {ctx_a} {ctx_b.capitalize()}``     ``" " + ending``
winogrande       sentence up to the blank, option filled in       ``" " + rest of the sentence``
===============  ===============================================  ==============================

Deviations forced by the data (documented, deliberate):

* **BoolQ** has no passage in this copy, so lm-eval's ``"{passage}\\nQuestion: {question}?\\nAnswer:"``
  loses its passage line and the context starts at ``Question:`` (no leading newline).  The
  questions here already end in the ``?`` that lm-eval appends, so it is not doubled.  Scores are
  not comparable with published BoolQ numbers, which use the passage.
* **SciQ** has no ``support`` paragraph here: the context is ``Question: {q}\\nAnswer:`` (lm-eval
  would prepend ``{support}\\n``).  Choices keep the file's order (lm-eval puts the correct answer
  last); only exact ties can differ.
* **Social IQa**: the file joins the context and question with a space, which is exactly what
  lm-eval's ``Q: {context} {question}`` does.
* **HellaSwag**: the text file holds ``activity_label + ": " + ctx`` already joined, with the
  WikiHow ``[title]``/``[step]`` tags already replaced, and ``ctx_b`` not capitalised.  We re-apply
  lm-eval's ``preprocess`` (strip, `` [title]`` -> ``". "``, drop ``[...]``, collapse double
  spaces) to the context and endings, and recover ``ctx_b.capitalize()`` heuristically: when the
  context does not end in ``"."`` (exactly the 3,243 ActivityNet items; every WikiHow one does), the fragment after
  the last sentence end is taken as ``ctx_b`` and its first letter upper-cased (those fragments are
  all lower case, so this equals ``str.capitalize``).
* **WinoGrande** uses lm-eval's partial evaluation: one context per option (the sentence up to the
  blank with the option substituted) and the same continuation (``" "`` + the rest of the sentence
  after the blank, stripped) for both.  ``acc_norm`` then equals ``acc`` (lm-eval reports only
  ``acc`` for this task).
* **ARC / OBQA / SIQA / WinoGrande** choices are joined by single spaces in the instruction text, so
  a choice's own trailing whitespace cannot be recovered there; PIQA/SciQ choices are separated by
  newlines and keep any trailing spaces of the original solution text.

Tokenisation follows lm-eval's ``HFLM``: trailing whitespace of the context moves to the
continuation, ``context + continuation`` is encoded whole, and the continuation tokens are the tail
after the encoded context's length.  Special tokens the tokenizer adds in front (BOS) are kept in
front of the context; special tokens it appends (EOS) are dropped.  Over-long inputs are truncated
from the left to ``max_length + 1`` tokens, like lm-eval.  ``*_stderr`` is the standard error of
the mean with the sample standard deviation (ddof=1), lm-eval's closed form.

``benchmarks/zeroshot_agreement.py`` checks all this against lm-eval 0.4 itself (per-choice
requests identical, log-likelihoods equal to float32 rounding).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

__all__ = [
    "MCItem",
    "TASKS",
    "default_data_root",
    "task_path",
    "load_task",
    "parse_commonsense_file",
    "parse_hellaswag_file",
    "encode_pair",
    "loglikelihoods",
    "score_items",
    "evaluate_tasks",
]


@dataclass
class MCItem:
    """One multiple-choice item.

    ``context``: the prompt shared by all choices.  ``choices``: the choice texts, without the
    delimiter that joins them to the context (``acc_norm`` divides by their length in characters).
    ``gold``: index of the correct choice.  ``contexts``: per-choice contexts for partial evaluation
    (WinoGrande); when set, choice ``i`` is scored after ``contexts[i]`` instead of ``context``.
    ``target_delimiter``: put between context and choice (lm-eval's default ``" "``).
    """

    context: str
    choices: list[str]
    gold: int
    contexts: list[str] | None = None
    target_delimiter: str = " "

    def __post_init__(self) -> None:
        if not self.choices:
            raise ValueError("MCItem needs at least one choice")
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold} out of range for {len(self.choices)} choices")
        if self.contexts is not None and len(self.contexts) != len(self.choices):
            raise ValueError(f"{len(self.contexts)} contexts for {len(self.choices)} choices")

    def requests(self) -> list[tuple[str, str]]:
        """``(context, continuation)`` pairs, one per choice, as lm-eval builds them."""
        ctxs = self.contexts if self.contexts is not None else [self.context] * len(self.choices)
        return [(c, self.target_delimiter + ch) for c, ch in zip(ctxs, self.choices)]


# --------------------------------------------------------------------------------------------
# data files
# --------------------------------------------------------------------------------------------

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_ROOT_ENV = "MOEFY_DATA_ROOT"


def default_data_root() -> Path:
    """``$MOEFY_DATA_ROOT`` if set, else ``<project>/../shared/data``."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    return _PROJECT_ROOT.parent / "shared" / "data"


_INSTRUCTION_PREFIXES = (
    "Please choose the correct answer to the question: ",
    "Please choose the correct solution to the question: ",
    "Please answer the following question with true or false, question: ",
    "Please choose the correct answer to fill in the blank to complete the given sentence: ",
)
_FORMAT_MARK = "Answer format: "


def _strip_separator(text: str) -> str:
    """Remove the one separator LLM-Adapters put after a field: ``\\n\\n``, ``\\n`` or a space."""
    for sep in ("\n\n", "\n", " "):
        if text.endswith(sep):
            return text[: -len(sep)]
    return text


@dataclass
class _Raw:
    question: str
    choices: list[str]  # empty for true/false items
    labels: list[str]  # from "Answer format: a/b/c", lower case
    answer: str


def _split_instruction(instruction: str, answer: str, where: str) -> _Raw:
    pos = instruction.rfind(_FORMAT_MARK)
    if pos < 0:
        raise ValueError(f"{where}: no '{_FORMAT_MARK.strip()}' line in instruction")
    labels = [s.strip().lower() for s in instruction[pos + len(_FORMAT_MARK) :].strip().split("/")]
    body = _strip_separator(instruction[:pos])
    for prefix in _INSTRUCTION_PREFIXES:
        if body.startswith(prefix):
            body = body[len(prefix) :]
            break
    else:
        cut = body.find(": ")
        if cut < 0:
            raise ValueError(f"{where}: unrecognised instruction header")
        body = body[cut + 2 :]
    if labels == ["true", "false"]:
        return _Raw(body, [], labels, answer.strip().lower())
    m = re.fullmatch(r"([a-z]+)(\d+)", labels[0])
    if not m:
        raise ValueError(f"{where}: unexpected answer format {labels!r}")
    word = m.group(1).capitalize()  # answer -> Answer, solution -> Solution, option -> Option
    starts: list[tuple[int, int]] = []
    search_from = 0
    for k in range(1, len(labels) + 1):
        tag = f"{word}{k}: "
        # the first choice follows the question after a blank line (or a space for WinoGrande)
        idx = body.find(tag, search_from)
        if k == 1:
            for lead in ("\n\n", "\n", " "):
                j = body.find(lead + tag, search_from)
                if j >= 0:
                    idx = j + len(lead)
                    break
        if idx < 0:
            raise ValueError(f"{where}: choice '{tag.strip()}' not found")
        starts.append((idx, idx + len(tag)))
        search_from = idx + len(tag)
    question = _strip_separator(body[: starts[0][0]])
    choices = []
    for k, (_, text_start) in enumerate(starts):
        end = starts[k + 1][0] if k + 1 < len(starts) else len(body)
        text = body[text_start:end]
        choices.append(_strip_separator(text) if k + 1 < len(starts) else text)
    return _Raw(question, choices, labels, answer.strip().lower())


def _gold_index(raw: _Raw, where: str) -> int:
    if raw.answer not in raw.labels:
        raise ValueError(f"{where}: answer {raw.answer!r} not among {raw.labels!r}")
    return raw.labels.index(raw.answer)


def _qa_item(template: str) -> Callable[[_Raw, str], MCItem]:
    def build(raw: _Raw, where: str) -> MCItem:
        return MCItem(template.format(q=raw.question), raw.choices, _gold_index(raw, where))

    return build


def _boolq_item(raw: _Raw, where: str) -> MCItem:
    if raw.answer not in ("true", "false"):
        raise ValueError(f"{where}: boolq answer must be true/false, got {raw.answer!r}")
    # lm-eval: "{passage}\nQuestion: {question}?\nAnswer:" with choices ["no", "yes"]; no passage here.
    # LLM-Adapters already appended the "?" that lm-eval adds to the (unpunctuated) BoolQ question.
    question = raw.question[:-1] if raw.question.endswith("?") else raw.question
    return MCItem(f"Question: {question}?\nAnswer:", ["no", "yes"], 1 if raw.answer == "true" else 0)


def _winogrande_item(raw: _Raw, where: str) -> MCItem:
    sentence = raw.question
    blank = sentence.find("_")
    if blank < 0:
        raise ValueError(f"{where}: winogrande sentence has no '_' blank")
    rest = sentence[blank + 1 :].strip()
    contexts = [sentence[:blank] + opt for opt in raw.choices]
    return MCItem(sentence, [rest] * len(raw.choices), _gold_index(raw, where), contexts=contexts)


_COMMONSENSE_BUILDERS: dict[str, Callable[[_Raw, str], MCItem]] = {
    "arc": _qa_item("Question: {q}\nAnswer:"),
    "piqa": _qa_item("Question: {q}\nAnswer:"),
    "sciq": _qa_item("Question: {q}\nAnswer:"),
    "openbookqa": _qa_item("{q}"),
    "social_iqa": _qa_item("Q: {q}\nA:"),
    "boolq": _boolq_item,
    "winogrande": _winogrande_item,
}


def parse_commonsense_file(path: str | os.PathLike, kind: str) -> list[MCItem]:
    """Parse an LLM-Adapters ``*.test.json`` file; ``kind`` is one of
    ``arc, piqa, sciq, openbookqa, social_iqa, boolq, winogrande``."""
    if kind not in _COMMONSENSE_BUILDERS:
        raise ValueError(f"unknown commonsense file kind {kind!r}; expected one of {sorted(_COMMONSENSE_BUILDERS)}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task data file not found: {path}")
    with path.open(encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of items")
    build = _COMMONSENSE_BUILDERS[kind]
    items = []
    for i, row in enumerate(rows):
        where = f"{path.name} item {i}"
        try:
            instruction, answer = row["instruction"], row["answer"]
        except (KeyError, TypeError):
            raise ValueError(f"{where}: missing 'instruction' or 'answer'") from None
        items.append(build(_split_instruction(instruction, answer, where), where))
    return items


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's hellaswag preprocessing (WikiHow bracket artefacts)
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


_SENTENCE_END = re.compile(r"[.!?][\"')]?\s")


def _capitalize_ctx_b(ctx: str) -> str:
    """Re-create lm-eval's ``ctx_a + " " + ctx_b.capitalize()`` from the joined context."""
    label, sep, body = ctx.partition(": ")
    if not sep:
        label, body = "", ctx
    if not body or body.rstrip().endswith("."):
        return ctx  # ctx_b empty (the WikiHow items all end in "."): nothing to capitalise
    ends = list(_SENTENCE_END.finditer(body))
    start = ends[-1].end() if ends else 0
    tail = body[start:]
    tail = tail[:1].upper() + tail[1:]
    return f"{label}{sep}{body[:start]}{tail}"


def parse_hellaswag_file(path: str | os.PathLike) -> list[MCItem]:
    """Parse ``hellaswag_val.txt``: 6 lines per item (context, gold 0-3, four endings)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"task data file not found: {path}")
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path.name}: {len(lines)} lines, not a multiple of 6")
    items = []
    for i in range(0, len(lines), 6):
        ctx, gold, *endings = lines[i : i + 6]
        try:
            g = int(gold)
        except ValueError:
            raise ValueError(f"{path.name} line {i + 2}: gold index {gold!r} is not an integer") from None
        query = _hellaswag_preprocess(_capitalize_ctx_b(ctx))
        items.append(MCItem(query, [_hellaswag_preprocess(e) for e in endings], g))
    return items


@dataclass(frozen=True)
class _TaskSpec:
    relpath: str
    parse: Callable[[Path], list[MCItem]]


def _cs(kind: str) -> Callable[[Path], list[MCItem]]:
    return lambda p: parse_commonsense_file(p, kind)


TASKS: dict[str, _TaskSpec] = {
    "arc_easy": _TaskSpec("commonsense/ARC-Easy.test.json", _cs("arc")),
    "arc_challenge": _TaskSpec("commonsense/ARC-Challenge.test.json", _cs("arc")),
    "piqa": _TaskSpec("commonsense/piqa.test.json", _cs("piqa")),
    "hellaswag": _TaskSpec("hellaswag/hellaswag_val.txt", parse_hellaswag_file),
    "winogrande": _TaskSpec("commonsense/winogrande.test.json", _cs("winogrande")),
    "boolq": _TaskSpec("commonsense/boolq.test.json", _cs("boolq")),
    "sciq": _TaskSpec("commonsense/sciq.test.json", _cs("sciq")),
    "openbookqa": _TaskSpec("commonsense/openbookqa.test.json", _cs("openbookqa")),
    "social_iqa": _TaskSpec("commonsense/social_i_qa.test.json", _cs("social_iqa")),
}


def _check_task(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; supported: {', '.join(TASKS)}")


def task_path(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """The data file of task ``name`` under ``data_root`` (default :func:`default_data_root`)."""
    _check_task(name)
    root = Path(data_root) if data_root is not None else default_data_root()
    return root / TASKS[name].relpath


def load_task(name: str, data_root: str | os.PathLike | None = None, limit: int | None = None) -> list[MCItem]:
    """Items of task ``name`` in file order; with ``limit``, the first ``limit`` of them."""
    path = task_path(name, data_root)
    if not path.is_file():
        raise ValueError(f"data file for task {name!r} not found: {path}")
    items = TASKS[name].parse(path)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        items = items[:limit]
    return items


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def _special_affixes(tokenizer: Any) -> tuple[list[int], int]:
    """``(prefix ids, number of suffix ids)`` the tokenizer adds around plain text (BOS / EOS)."""
    probe = "hello world"
    with_sp = list(tokenizer.encode(probe))
    without = list(tokenizer.encode(probe, add_special_tokens=False))
    n = len(without)
    for i in range(len(with_sp) - n + 1):
        if with_sp[i : i + n] == without:
            return with_sp[:i], len(with_sp) - i - n
    return [], 0  # cannot tell: treat as adding nothing


def _encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    prefix, n_suffix = _special_affixes(tokenizer)
    if n_suffix == 0:
        return lambda s: list(tokenizer.encode(s))  # exactly what lm-eval's HFLM does
    return lambda s: prefix + list(tokenizer.encode(s, add_special_tokens=False))


def encode_pair(tokenizer: Any, context: str, continuation: str, _enc: Callable[[str], list[int]] | None = None) -> tuple[list[int], list[int]]:
    """lm-eval's context/continuation split: encode the whole string, continuation = the tail
    after the encoded context's length.  Trailing whitespace of the context moves to the
    continuation first.  A leading BOS (if the tokenizer adds one) stays with the context."""
    enc = _enc or _encoder(tokenizer)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = enc(context + continuation)
    ctx = enc(context)
    cont = whole[len(ctx) :]
    if not ctx:
        # nothing to condition on: start from BOS (or EOS), as lm-eval does for empty contexts
        start = getattr(tokenizer, "bos_token_id", None)
        if start is None:
            start = getattr(tokenizer, "eos_token_id", None)
        if start is None:
            raise ValueError("empty context and the tokenizer has neither a BOS nor an EOS token")
        ctx = [start]
    if not cont:
        raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
    return ctx, cont


def _model_max_length(model: Any, tokenizer: Any) -> int:
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    v = getattr(tokenizer, "model_max_length", None)
    if isinstance(v, int) and 0 < v < 1_000_000:
        return v
    return 2048


def _model_device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _logits_of(out: Any) -> torch.Tensor:
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def loglikelihoods(
    model: Any,
    tokenizer: Any,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 16,
    max_length: int | None = None,
) -> list[tuple[float, bool]]:
    """``(sum log p(continuation | context), is_greedy)`` for each ``(context, continuation)``.

    Batched (longest first, like lm-eval), right-padded with an attention mask, under no grad;
    log-softmax in float32.  Results come back in request order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not requests:
        return []
    enc = _encoder(tokenizer)
    max_len = max_length or _model_max_length(model, tokenizer)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None) or 0
    device = _model_device(model)

    seqs: list[tuple[list[int], int]] = []  # (input ids fed to the model, continuation length)
    conts: list[list[int]] = []
    for ctx_text, cont_text in requests:
        ctx, cont = encode_pair(tokenizer, ctx_text, cont_text, enc)
        if len(cont) > max_len:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds the model's max length {max_len}")
        full = (ctx + cont)[-(max_len + 1) :][:-1]  # truncate from the left, like lm-eval
        seqs.append((full, len(cont)))
        conts.append(cont)

    order = sorted(range(len(seqs)), key=lambda i: (-len(seqs[i][0]), i))
    results: list[tuple[float, bool] | None] = [None] * len(seqs)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.inference_mode():
            for b in range(0, len(order), batch_size):
                idx = order[b : b + batch_size]
                width = max(len(seqs[i][0]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):
                    toks = seqs[i][0]
                    ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
                    mask[r, : len(toks)] = 1
                logits = _logits_of(model(input_ids=ids.to(device), attention_mask=mask.to(device)))
                for r, i in enumerate(idx):
                    inplen, contlen = len(seqs[i][0]), seqs[i][1]
                    lp = logits[r, inplen - contlen : inplen].float().log_softmax(-1)
                    target = torch.tensor(conts[i], dtype=torch.long, device=lp.device)
                    ll = lp.gather(-1, target[:, None]).sum().item()
                    greedy = bool((lp.argmax(-1) == target).all().item())
                    results[i] = (ll, greedy)
    finally:
        if was_training and hasattr(model, "train"):
            model.train()
    return results  # type: ignore[return-value]


def _mean_stderr(xs: Sequence[float]) -> float:
    """Standard error of the mean (sample std, ddof=1, over sqrt(n)), as lm-eval reports."""
    n = len(xs)
    if n < 2:
        return float("nan")
    mu = sum(xs) / n
    var = sum((x - mu) ** 2 for x in xs) / (n - 1)
    return math.sqrt(var / n)


def _argmax(xs: Sequence[float]) -> int:
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best  # first maximum, like numpy.argmax


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[MCItem],
    batch_size: int = 16,
    limit: int | None = None,
    max_length: int | None = None,
    return_details: bool = False,
) -> dict[str, Any]:
    """Score multiple-choice ``items`` (the first ``limit`` of them if given).

    Returns ``{"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}``; with
    ``return_details`` also ``"details"``: per item ``{"lls", "pred", "pred_norm", "gold"}``.
    """
    items = list(items)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        items = items[:limit]
    if not items:
        raise ValueError("no items to score")
    requests: list[tuple[str, str]] = []
    for it in items:
        requests.extend(it.requests())
    lls = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, max_length=max_length)

    accs: list[float] = []
    norms: list[float] = []
    details = []
    pos = 0
    for it in items:
        k = len(it.choices)
        item_lls = [ll for ll, _ in lls[pos : pos + k]]
        pos += k
        pred = _argmax(item_lls)
        pred_norm = _argmax([ll / max(len(c), 1) for ll, c in zip(item_lls, it.choices)])
        accs.append(1.0 if pred == it.gold else 0.0)
        norms.append(1.0 if pred_norm == it.gold else 0.0)
        if return_details:
            details.append({"lls": item_lls, "pred": pred, "pred_norm": pred_norm, "gold": it.gold})
    out: dict[str, Any] = {
        "acc": sum(accs) / len(accs),
        "acc_stderr": _mean_stderr(accs),
        "acc_norm": sum(norms) / len(norms),
        "acc_norm_stderr": _mean_stderr(norms),
        "n": len(items),
    }
    if return_details:
        out["details"] = details
    return out


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Iterable[str] | str,
    data_root: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Zero-shot evaluation on each task: ``{task: score_items(...) result}``.

    ``tasks`` is a list of names (or one comma-separated string); all names and data files are
    checked before any model call.  ``limit`` takes the first N items of each task in file order.
    """
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    names = [t for t in names if t]
    if not names:
        raise ValueError(f"no tasks given; supported: {', '.join(TASKS)}")
    for name in names:  # every name first, so an unknown one is reported whatever the files
        task_path(name, data_root)
    for name in names:
        path = task_path(name, data_root)
        if not path.is_file():
            raise ValueError(f"data file for task {name!r} not found: {path}")
    results = {}
    for name in names:
        items = load_task(name, data_root, limit=limit)
        results[name] = score_items(model, tokenizer, items, batch_size=batch_size, max_length=max_length)
    return results
