"""Where recovery training's memory goes: one training step of ``moefy train``'s student and
teacher, measured piece by piece.

For a moefy checkpoint and its teacher, one step (batch x seq_len tokens) is run as the trainer
runs it (:class:`moefy.training.trainer.DistillModule`, AdamW over the default groups), and the
script reports: the teacher's and the student's weights, the trained parameters' gradients and
AdamW states (counted from the tensors), the activations autograd saves for the backward pass
(every tensor packed by ``torch.autograd.graph.saved_tensors_hooks``, de-duplicated by storage),
and the process's peak RSS (``ru_maxrss``) after loading and after the step; ``--attn`` picks the
attention kernel, ``--checkpointing`` turns on gradient checkpointing.  The issue's bound: peak
within 2x of weights + gradients + optimizer states + activations.

    python benchmarks/bench_train_memory.py out/smollm2-135m-25pct/layerwise --json benchmarks/results/train_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--attn", default=None, help="attention kernel for the student and teacher: eager | sdpa")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--json", type=Path, required=True)
    args = ap.parse_args()

    from moefy.models import load
    from moefy.training.config import TrainConfig
    from moefy.training.run import load_student
    from moefy.training.student import build_student, set_trainable
    from moefy.training.trainer import DistillModule, Teacher

    t0 = time.time()
    model, tok, record = load_student(args.ckpt)
    teacher = load(args.teacher).model
    if args.attn:
        for m in (model.model, teacher):
            m.config._attn_implementation = args.attn
    student = build_student(model, False, neurons=[layer.get("neurons") for layer in record.get("layers", [])])
    cfg = TrainConfig(seq_len=args.seq_len, batch_size=args.batch, gradient_checkpointing=args.checkpointing)
    groups = set_trainable(student.model, cfg.group_lrs(), False)
    params = [p for g in groups.values() for _, p in g]
    opt = torch.optim.AdamW([{"params": params, "lr": 1e-5}])
    module = DistillModule(student, cfg)
    if args.checkpointing:
        student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    module.train()
    t = Teacher(teacher)
    rss_loaded = rss_mib()
    ids = torch.randint(0, len(tok), (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    saved: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        try:
            key = x.untyped_storage().data_ptr()
            saved[key] = max(saved.get(key, 0), x.untyped_storage().nbytes())
        except RuntimeError:
            pass
        return x

    th = t.hidden(ids)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss, _ = module(ids, th, t.head, t.softcap)
    loss.backward()
    opt.step()
    rss_step = rss_mib()
    n_student = sum(p.numel() * p.element_size() for p in student.model.parameters())
    n_teacher = sum(p.numel() * p.element_size() for p in teacher.parameters())
    n_grad = sum(p.numel() * p.element_size() for p in params)
    n_opt = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    acts = sum(saved.values())
    accounted = n_student + n_teacher + n_grad + n_opt + acts
    row = {
        "checkpoint": str(args.ckpt), "batch": args.batch, "seq_len": args.seq_len,
        "attn": args.attn or student.model.config._attn_implementation, "checkpointing": args.checkpointing,
        "student_weights_mib": mib(n_student), "teacher_weights_mib": mib(n_teacher), "gradients_mib": mib(n_grad),
        "adamw_states_mib": mib(n_opt), "saved_activations_mib": mib(acts), "accounted_mib": mib(accounted),
        "peak_rss_after_load_mib": round(rss_loaded, 1), "peak_rss_after_step_mib": round(rss_step, 1),
        "peak_over_accounted": round(rss_step * 2**20 / accounted, 3), "seconds": round(time.time() - t0, 1),
        "command": " ".join(sys.argv),
    }
    rows = json.loads(args.json.read_text()) if args.json.is_file() else []
    rows.append(row)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    for k, v in row.items():
        print(f"{k:28s} {v}")


if __name__ == "__main__":
    main()
