"""moefy's offline copies of zero-shot task data, turned into lm-eval task configs.

lm-evaluation-harness (``moefy.zeroshot``) does the scoring; what it cannot do is read the copies
under ``shared/data`` (see ``shared/README.md``), which are not in the Hugging Face schema its task
definitions expect:

* ``commonsense/*.test.json`` -- LLM-Adapters format: a JSON list of ``{instruction, input, output,
  answer}``; the question and the choices live inside ``instruction`` (``Answer1: ...``,
  ``Solution1: ...``, ``Option1: ...``), the gold label in ``answer`` (``answer2``, ``solution1``,
  ``option2``, ``true``/``false``).
* ``hellaswag/hellaswag_val.txt`` -- six lines per item: ``activity_label: ctx``, gold index,
  four endings.

So this module parses them back into lm-eval's own document schema (ai2_arc, piqa, winogrande,
openbookqa, hellaswag, super_glue/boolq, sciq, siqa fields) and writes, per task, a JSONL file and
a task YAML that ``include``s lm-eval's installed definition of that task (its prompt, choices,
target, metrics and, for HellaSwag and WinoGrande, its processing functions) and swaps only the
dataset for ``dataset_path: json`` + ``data_files``: nothing is fetched over the network.

Where the copies lack a field lm-eval's prompt uses, the YAML overrides that prompt (deliberate,
documented deviations; scores are not comparable with published numbers for these tasks):

* **BoolQ** has no passage: ``Question: {question}?\\nAnswer:`` (lm-eval prepends
  ``{passage}\\n``); lm-eval's ``acc_norm`` is added to its metrics.
* **SciQ** has no ``support`` paragraph: ``Question: {question}\\nAnswer:``.
* **Social IQa**: the copy joins context and question with one space, which is exactly lm-eval's
  ``Q: {context} {question}\\nA:``; ``acc_norm`` is added to lm-eval's metrics.
* **HellaSwag**: the file holds ``activity_label + ": " + ctx_a + " " + ctx_b`` already joined (WikiHow
  tags already replaced).  ``ctx_b`` is recovered as the fragment after the last sentence end when the
  context does not end in ``"."`` (the 3,243 ActivityNet items; every WikiHow one does, and has an
  empty ``ctx_b``); lm-eval's ``process_docs`` then capitalises it and preprocesses as usual.
* **ARC / OBQA / SIQA / WinoGrande** choices are joined by single spaces in the instruction text, so
  a choice's own trailing whitespace cannot be recovered there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LOCAL_TASKS", "default_data_root", "existing_task_path", "task_path", "load_docs", "write_task_config"]

_PROJECT_ROOT = Path(__file__).resolve().parents[2]
DATA_ROOT_ENV = "MOEFY_DATA_ROOT"


def default_data_root() -> Path:
    """``$MOEFY_DATA_ROOT`` if set, else ``<project>/../shared/data``."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    return _PROJECT_ROOT.parent / "shared" / "data"


# ------------------------------------------------------------------------------- LLM-Adapters
_INSTRUCTION_PREFIXES = (
    "Please choose the correct answer to the question: ",
    "Please choose the correct solution to the question: ",
    "Please answer the following question with true or false, question: ",
    "Please choose the correct answer to fill in the blank to complete the given sentence: ",
)
_FORMAT_MARK = "Answer format: "
_LETTERS = "ABCDEFGH"


def _strip_separator(text: str) -> str:
    """Remove the one separator LLM-Adapters put after a field: ``\\n\\n``, ``\\n`` or a space."""
    for sep in ("\n\n", "\n", " "):
        if text.endswith(sep):
            return text[: -len(sep)]
    return text


@dataclass
class Raw:
    """One LLM-Adapters item taken apart: question, choice texts, answer labels, gold index."""

    question: str
    choices: list[str]  # empty for true/false items
    labels: list[str]  # from "Answer format: a/b/c", lower case
    answer: str

    def gold(self, where: str) -> int:
        if self.answer not in self.labels:
            raise ValueError(f"{where}: answer {self.answer!r} not among {self.labels!r}")
        return self.labels.index(self.answer)


def split_instruction(instruction: str, answer: str, where: str) -> Raw:
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
        return Raw(body, [], labels, answer.strip().lower())
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
    return Raw(question, choices, labels, answer.strip().lower())


def _lettered(raw: Raw, where: str, question_key: str) -> dict[str, Any]:  # ai2_arc / openbookqa
    return {question_key: raw.question, "choices": {"text": raw.choices, "label": list(_LETTERS[: len(raw.choices)])},
            "answerKey": _LETTERS[raw.gold(where)]}


def _piqa(raw: Raw, where: str) -> dict[str, Any]:
    return {"goal": raw.question, "sol1": raw.choices[0], "sol2": raw.choices[1], "label": raw.gold(where)}


def _winogrande(raw: Raw, where: str) -> dict[str, Any]:
    if "_" not in raw.question:
        raise ValueError(f"{where}: winogrande sentence has no '_' blank")
    return {"sentence": raw.question, "option1": raw.choices[0], "option2": raw.choices[1], "answer": str(raw.gold(where) + 1)}


def _boolq(raw: Raw, where: str) -> dict[str, Any]:
    if raw.answer not in ("true", "false"):
        raise ValueError(f"{where}: boolq answer must be true/false, got {raw.answer!r}")
    # LLM-Adapters already appended the "?" that lm-eval's prompt adds to the (unpunctuated) question
    question = raw.question[:-1] if raw.question.endswith("?") else raw.question
    return {"question": question, "passage": "", "label": 1 if raw.answer == "true" else 0}


def _sciq(raw: Raw, where: str) -> dict[str, Any]:
    gold = raw.gold(where)
    others = [c for i, c in enumerate(raw.choices) if i != gold]
    return {"question": raw.question, "support": "", "distractor1": others[0], "distractor2": others[1],
            "distractor3": others[2], "correct_answer": raw.choices[gold]}


def _siqa(raw: Raw, where: str) -> dict[str, Any]:
    doc = {"context": raw.question, "question": "", "label": str(raw.gold(where) + 1)}
    doc.update({f"answer{_LETTERS[i]}": c for i, c in enumerate(raw.choices)})
    return doc


def commonsense_docs(path: Path, to_doc: Callable[[Raw, str], dict[str, Any]], limit: int | None = None) -> list[dict[str, Any]]:
    """lm-eval documents from an LLM-Adapters ``*.test.json`` file (the first ``limit``)."""
    with path.open(encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of items")
    docs = []
    for i, row in enumerate(rows[:limit]):
        where = f"{path.name} item {i}"
        try:
            instruction, answer = row["instruction"], row["answer"]
        except (KeyError, TypeError):
            raise ValueError(f"{where}: missing 'instruction' or 'answer'") from None
        docs.append(to_doc(split_instruction(instruction, answer, where), where))
    return docs


# ------------------------------------------------------------------------------- HellaSwag
_SENTENCE_END = re.compile(r"[.!?][\"')]?\s")


def _split_hellaswag_context(ctx: str) -> tuple[str, str, str]:
    """``activity_label, ctx_a, ctx_b`` from ``activity_label + ": " + ctx_a + " " + ctx_b``."""
    label, sep, body = ctx.partition(": ")
    if not sep:
        label, body = "", ctx
    if not body or body.rstrip().endswith("."):
        return label, body, ""  # WikiHow items end in "." and have no ctx_b
    ends = list(_SENTENCE_END.finditer(body))
    start = ends[-1].end() if ends else 0
    return label, body[:start].rstrip(), body[start:]


def hellaswag_docs(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """lm-eval documents (``activity_label, ctx_a, ctx_b, endings, label``) from ``hellaswag_val.txt``."""
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path.name}: {len(lines)} lines, not a multiple of 6")
    docs = []
    for i in range(0, len(lines) if limit is None else min(len(lines), 6 * limit), 6):
        ctx, gold, *endings = lines[i : i + 6]
        try:
            g = int(gold)
        except ValueError:
            raise ValueError(f"{path.name} line {i + 2}: gold index {gold!r} is not an integer") from None
        label, ctx_a, ctx_b = _split_hellaswag_context(ctx)
        docs.append({"activity_label": label, "ctx_a": ctx_a, "ctx_b": ctx_b, "endings": endings, "label": str(g)})
    return docs


# ------------------------------------------------------------------------------- the registry
_ACC_NORM = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
             {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


@dataclass(frozen=True)
class LocalTask:
    """A task moefy has an offline copy of: its file, how it becomes lm-eval documents, the lm-eval
    definition it reuses (``include``, relative to ``lm_eval/tasks``) and what it overrides there."""

    relpath: str
    docs: Callable[[Path, int | None], list[dict[str, Any]]]
    include: str
    overrides: dict[str, Any] = field(default_factory=dict)


def _cs(to_doc: Callable[[Raw, str], dict[str, Any]]) -> Callable[[Path, int | None], list[dict[str, Any]]]:
    return lambda p, limit: commonsense_docs(p, to_doc, limit)


LOCAL_TASKS: dict[str, LocalTask] = {
    "arc_easy": LocalTask("commonsense/ARC-Easy.test.json", _cs(lambda r, w: _lettered(r, w, "question")), "arc/arc_easy.yaml"),
    "arc_challenge": LocalTask("commonsense/ARC-Challenge.test.json", _cs(lambda r, w: _lettered(r, w, "question")),
                               "arc/arc_challenge.yaml"),
    "piqa": LocalTask("commonsense/piqa.test.json", _cs(_piqa), "piqa/piqa.yaml"),
    "hellaswag": LocalTask("hellaswag/hellaswag_val.txt", hellaswag_docs, "hellaswag/hellaswag.yaml"),
    "winogrande": LocalTask("commonsense/winogrande.test.json", _cs(_winogrande), "winogrande/default.yaml"),
    "openbookqa": LocalTask("commonsense/openbookqa.test.json", _cs(lambda r, w: _lettered(r, w, "question_stem")),
                            "openbookqa/openbookqa.yaml"),
    "boolq": LocalTask("commonsense/boolq.test.json", _cs(_boolq), "super_glue/boolq/default.yaml",
                       {"doc_to_text": "Question: {{question}}?\nAnswer:", "metric_list": _ACC_NORM}),
    "sciq": LocalTask("commonsense/sciq.test.json", _cs(_sciq), "sciq/sciq.yaml", {"doc_to_text": "Question: {{question}}\nAnswer:"}),
    "social_iqa": LocalTask("commonsense/social_i_qa.test.json", _cs(_siqa), "siqa/siqa.yaml",
                            {"doc_to_text": "Q: {{context}}\nA:", "metric_list": _ACC_NORM}),
}


def task_path(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """The data file of local task ``name`` under ``data_root`` (default :func:`default_data_root`)."""
    if name not in LOCAL_TASKS:
        raise ValueError(f"no offline copy of task {name!r}; moefy has: {', '.join(LOCAL_TASKS)}")
    root = Path(data_root) if data_root is not None else default_data_root()
    return root / LOCAL_TASKS[name].relpath


def existing_task_path(name: str, data_root: str | os.PathLike | None = None) -> Path:
    """:func:`task_path`, refused in one line when the file is not there."""
    path = task_path(name, data_root)
    if not path.is_file():
        raise ValueError(f"data file for task {name!r} not found: {path}")
    return path


def load_docs(name: str, data_root: str | os.PathLike | None = None, limit: int | None = None) -> list[dict[str, Any]]:
    """lm-eval documents of local task ``name`` in file order (the first ``limit``)."""
    path = existing_task_path(name, data_root)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return LOCAL_TASKS[name].docs(path, limit)


def write_task_config(name: str, out_dir: Path, lm_eval_tasks: Path, data_root: str | os.PathLike | None = None,
                      limit: int | None = None) -> Path:
    """Write ``<name>.jsonl`` and ``<name>.yaml`` (an lm-eval task of that name over the local copy)
    into ``out_dir``; returns the YAML's path."""
    spec = LOCAL_TASKS[name]
    data = out_dir / f"{name}.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for doc in load_docs(name, data_root, limit):
            f.write(json.dumps(doc) + "\n")
    config: dict[str, Any] = {
        "include": str((lm_eval_tasks / spec.include).resolve()),
        "task": name,
        "tag": [],
        "dataset_path": "json",
        "dataset_name": None,
        # the datasets cache of this file stays in out_dir (removed with it), not in ~/.cache
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(out_dir / "hf-cache")},
        "training_split": None,
        "validation_split": None,
        "test_split": "test",
        "fewshot_split": None,
        **spec.overrides,
    }
    path = out_dir / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")  # JSON is YAML
    return path
