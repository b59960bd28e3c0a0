"""Evaluation and training texts of three domains, cut from the offline data so they never overlap.

moefy's quality figures are perplexities on text of more than one kind (a model calibrated and
trained on WikiText fits WikiText; what users judge is how it does elsewhere) plus zero-shot
accuracy.  From the shared data folder (``../shared/data`` or ``$MOEFY_DATA_ROOT``):

* ``wiki``: WikiText-2 raw test, the standard PPL text (calibration and training use WikiText-2
  *valid*, ``wiki_train``);
* ``stories``: the second half (by lines) of the TinyStories validation head; the first half is
  ``stories_train``, for calibration and training mixtures;
* ``hellaswag``: HellaSwag validation items from :data:`HELLASWAG_FIRST` on (ActivityNet and
  WikiHow descriptions, each context followed by its gold ending), a domain moefy never trains
  on; zero-shot runs score HellaSwag's *first* items (``--limit``), so the two never share one.

:func:`prepare` writes the derived files once into a folder of the caller's (never into the
data folder) and returns every path by name.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CalibrationDataError
from .task_data import default_data_root

HELLASWAG_FIRST = 8042  # items 8042..10041 (2,000 items) become text; zero-shot limits stay below
TEXT_NAMES = ("wiki", "stories", "hellaswag")


def _write(path: Path, text: str) -> None:
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _need(p: Path) -> Path:
    if not p.is_file():
        raise CalibrationDataError(f"data file not found: {p} (the shared data folder; set $MOEFY_DATA_ROOT)")
    return p


def hellaswag_text(path: Path, first: int = HELLASWAG_FIRST) -> str:
    """Items ``first..`` of ``hellaswag_val.txt`` (six lines each: context, gold index, four
    endings) as plain text, one paragraph per item: the context and its gold ending."""
    lines = _need(path).read_text(encoding="utf-8").splitlines()
    paras = []
    for i in range(first * 6, len(lines) - 5, 6):
        ctx, gold = lines[i], int(lines[i + 1])
        _, _, body = ctx.partition(": ")
        paras.append(f"{body or ctx} {lines[i + 2 + gold]}".strip())
    return "\n\n".join(paras) + "\n"


def prepare(out_dir: str | Path, data_root: str | Path | None = None) -> dict[str, Path]:
    """The texts by name: ``wiki``, ``stories``, ``hellaswag`` (evaluation) and ``wiki_train``,
    ``stories_train`` (calibration / training); derived ones are written into ``out_dir``."""
    root = Path(data_root) if data_root is not None else default_data_root()
    out = Path(out_dir)
    stories = _need(root / "tinystories" / "validation_head.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    half = len(stories) // 2
    while half < len(stories) and stories[half].strip():  # cut at a paragraph break
        half += 1
    paths = {
        "wiki": _need(root / "wikitext2" / "wiki.test.raw"),
        "wiki_train": _need(root / "wikitext2" / "wiki.valid.tokens"),
        "stories": out / "tinystories_heldout.txt",
        "stories_train": out / "tinystories_train.txt",
        "hellaswag": out / "hellaswag_text.txt",
    }
    _write(paths["stories_train"], "".join(stories[:half]))
    _write(paths["stories"], "".join(stories[half:]).lstrip("\n"))
    _write(paths["hellaswag"], hellaswag_text(root / "hellaswag" / "hellaswag_val.txt"))
    return paths
