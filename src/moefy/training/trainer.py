"""Recovery training: a moefy MoE trained against its dense teacher (DOT-MoE's alignment stage).

The loop, in the order it runs (nanoGPT-style, one file):

1. the student is the MoE with every FFN as a trainable :class:`~moefy.dotmoe.DotMoeLayer`
   (:mod:`moefy.training.student`); parameter groups by name, each with its learning rate;
2. AdamW, linear warmup then cosine decay to ``min_lr_ratio``, gradient clipping,
   gradient accumulation, optional gradient checkpointing, bf16 autocast on GPU;
   run by ``accelerate`` (one process on CPU or a GPU; DDP, FSDP or DeepSpeed when launched
   by ``accelerate launch`` / ``--num-processes``);
3. each optimizer step takes the global batch of that step from :class:`PackedData`
   (a pure function of the step), runs the teacher (no grad) and the student, and minimises
   ``kl_weight KL(teacher || student) + ce_weight CE + z_loss_weight z + balance_weight LB``
   with the vocabulary-sized part computed in chunks (:mod:`moefy.training.losses`);
4. with ``dot``, the Sinkhorn temperature anneals geometrically from ``tau_start`` to
   ``tau_end`` over ``anneal_fraction`` of the steps, after which the assignment is frozen;
5. every ``eval_every`` steps: held-out KL, perplexity and loss (hard routing, as exported), per
   held-out set when there are several, expert load; with ``keep_best`` the state with the lowest
   held-out ``select_by`` figure (default: the trained objective's loss) is kept (step 0 included);
6. every ``checkpoint_every`` steps the whole state (trainable tensors, optimizer, step,
   history, RNG) is written atomically to the work directory; rerunning continues from it and
   ends bit-identical to an uninterrupted run on CPU.
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..dotmoe import DotMoeLayer
from ..errors import NonFiniteLossError
from ..ot import geometric_schedule
from .config import TrainConfig
from .data import PackedData
from .losses import SparseTargets, distill_loss, distill_loss_cached
from .student import Student, set_trainable

Report = Callable[[dict[str, Any]], None]
Log = Callable[[str], None]
KILL_AFTER_STEP = "MOEFY_TEST_KILL_AFTER_STEP"  # test-only: SIGKILL itself once step N is checkpointed
LOSS_CHUNK_ELEMENTS = 1 << 25  # 128 MiB of fp32 logits per chunk of the loss


# what keep-best compares (lower is better): the trained objective's held-out value, its KL, or PPL
SELECT_BY = {"loss": "loss", "kl": "KL", "ppl": "perplexity"}


def selection_score(ev: dict[str, Any], select_by: str) -> float:
    """The held-out figure keep-best minimises, from one evaluation's record."""
    return float({"loss": ev.get("val_loss", ev["val_kl"]), "kl": ev["val_kl"], "ppl": ev["val_ppl"]}[select_by])


def _backbone(model: nn.Module) -> nn.Module:
    return getattr(model, model.base_model_prefix)


def _softcap(model: nn.Module) -> float | None:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


class DistillModule(nn.Module):
    """Student forward + loss in one module, so DDP/FSDP see every parameter used inside
    their own forward (the output layer's weight is read here, not through ``lm_head(...)``)."""

    def __init__(self, student: Student, cfg: TrainConfig) -> None:
        super().__init__()
        self.base = student.model
        self.cfg = cfg
        self.dots = list(student.layers.values())

    def chunk(self, head: nn.Module) -> int:
        """Positions per chunk of the vocabulary-sized loss: ``loss_chunk``, fewer for a large
        vocabulary, so that one chunk's fp32 logits stay within :data:`LOSS_CHUNK_ELEMENTS`
        (the loss holds about six such tensors at once: at 1,024 positions a 262k vocabulary
        would need 6 GB)."""
        return max(1, min(self.cfg.loss_chunk, LOSS_CHUNK_ELEMENTS // int(head.weight.shape[0])))

    def forward(self, ids: torch.Tensor, teacher_h: torch.Tensor | SparseTargets, teacher_head: nn.Module | None,
                teacher_softcap: float | None) -> tuple[torch.Tensor, dict[str, float]]:
        """``teacher_h``: the teacher's final hidden states (its ``teacher_head`` applies), or
        its cached top-k distributions (:mod:`moefy.training.teacher_cache`)."""
        h = _backbone(self.base)(input_ids=ids, use_cache=False).last_hidden_state
        head = self.base.get_output_embeddings()
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1).reshape(-1)
        d = h.shape[-1]
        if isinstance(teacher_h, SparseTargets):
            loss, stats = distill_loss_cached(h.reshape(-1, d), head.weight, head.bias, teacher_h, labels, self.cfg.kl_weight,
                                              self.cfg.ce_weight, _softcap(self.base), self.chunk(head))
        else:
            assert teacher_head is not None
            loss, stats = distill_loss(
                h.reshape(-1, d), head.weight, head.bias, teacher_h.reshape(-1, d), teacher_head.weight, teacher_head.bias,
                labels, self.cfg.kl_weight, self.cfg.ce_weight, _softcap(self.base), teacher_softcap, self.chunk(head),
            )
        routed = [m for m in self.dots if m.n_experts > 0]
        if routed and self.training:
            aux = [m.aux_losses() for m in routed]
            zl = torch.stack([a[0] for a in aux]).mean()
            lb = torch.stack([a[1] for a in aux]).mean()
            loss = loss + self.cfg.z_loss_weight * zl + self.cfg.balance_weight * lb
            stats["z_loss"], stats["balance"] = float(zl.detach()), float(lb.detach())
        return loss, stats


class Teacher:
    """The dense model, frozen: final hidden states for a batch, and its output layer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self.head = model.get_output_embeddings()
        self.softcap = _softcap(model)

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return _backbone(self.model)(input_ids=ids, use_cache=False).last_hidden_state

    @torch.no_grad()
    def logp_rows(self, ids: torch.Tensor) -> Any:
        """Each sequence's next-token log-probabilities ``[T, V]`` in fp32, one at a time."""
        from .losses import _logits

        h = self.hidden(ids)
        for row in h:
            yield torch.log_softmax(_logits(row, self.head.weight, self.head.bias, self.softcap)[0], dim=-1)


@dataclass
class TrainOutcome:
    steps: int
    tokens: int
    history: list[dict[str, Any]] = field(default_factory=list)  # held-out evaluations
    best_step: int | None = None
    neurons_moved: dict[int, int] = field(default_factory=dict)
    tokens_per_second: float = 0.0
    peak_rss_mib: float = 0.0
    peak_gpu_mib: float | None = None
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)  # training KL per step


# ----------------------------------------------------------------------------- checkpoints
class TrainState:
    """The work directory of a running training (``ckpt/`` replaced atomically each time)."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = path
        self.fingerprint = fingerprint

    def open(self) -> bool:
        state = self.path / "train.json"
        if state.is_file() and json.loads(state.read_text()).get("fingerprint") == self.fingerprint:
            return True
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        _atomic_json({"fingerprint": self.fingerprint}, state)
        return False

    @property
    def ckpt(self) -> Path:
        return self.path / "ckpt"

    def save(self, step: int, tensors: dict[str, torch.Tensor], best: dict[str, torch.Tensor], opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
        tmp = self.path / "ckpt.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
        if best:
            save_file({k: v.detach().contiguous().cpu() for k, v in best.items()}, str(tmp / "best.safetensors"))
        opt_state = opt.state_dict()
        opt_t = {f"{idx}.{name}": torch.as_tensor(v).contiguous().cpu() for idx, st in opt_state["state"].items() for name, v in st.items()}
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in opt_state["param_groups"]]
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "param_groups": groups}, indent=1))
        old = self.path / "ckpt.old"
        if self.ckpt.exists():
            os.replace(self.ckpt, old)
        os.replace(tmp, self.ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def load(self) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any], torch.Tensor] | None:
        c = self.ckpt
        if not (c / "meta.json").is_file():
            old = self.path / "ckpt.old"  # killed between the two renames
            if (old / "meta.json").is_file():
                os.replace(old, c)
            else:
                return None
        meta = json.loads((c / "meta.json").read_text())
        tensors = load_file(str(c / "state.safetensors"))
        best = load_file(str(c / "best.safetensors")) if (c / "best.safetensors").is_file() else {}
        opt_state: dict[str, Any] = {"state": {}, "param_groups": meta.pop("param_groups")}
        for k, v in load_file(str(c / "optimizer.safetensors")).items():
            idx, name = k.split(".", 1)
            opt_state["state"].setdefault(int(idx), {})[name] = v
        rng = load_file(str(c / "rng.safetensors"))["cpu"]
        return meta, tensors, best, opt_state, rng


def _atomic_json(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------- the loop
def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from 1 to ``min_ratio`` at ``total``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _mixed_precision(cfg: TrainConfig) -> str:
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(cfg: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # accelerate runs several CPU processes (gloo) only when told the run is CPU-only
    has_accel = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) \
        or torch.backends.mps.is_available()
    return Accelerator(
        cpu=not has_accel,
        mixed_precision=_mixed_precision(cfg),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False, broadcast_buffers=False)],
    )


def train(
    student: Student,
    teacher: Teacher,
    data: PackedData,
    cfg: TrainConfig,
    state: TrainState,
    accelerator: Any,
    learn_assignment: bool,
    log: Log = print,
    report: Report | None = None,
    metrics_path: Path | None = None,
    extra_eval: Callable[[nn.Module], dict[str, Any]] | None = None,
    held_out: Any = None,
    teacher_cache: Any = None,
) -> TrainOutcome:
    """Train ``student`` in place; returns what happened. The caller exports it.

    The held-out sequences (keep-best, curve) are ``held_out``'s, when given (``--val-data``),
    else the first ``val_sequences`` of ``data``, which the training order never visits.

    ``extra_eval(model)``, when given, runs at every held-out evaluation (hard routing, no
    grad) and its results are added to that evaluation's record (benchmarks score test text)."""
    t_start = time.time()
    dev = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    main = accelerator.is_main_process
    torch.manual_seed(cfg.seed)
    base = student.model
    dots = student.layers
    base.to(dev)
    teacher.model.to(dev)
    steps = cfg.steps(world)
    anneal_steps = int(round(cfg.anneal_fraction * steps)) if learn_assignment else 0
    for d in dots.values():
        if learn_assignment and d.learn_assignment:
            d.tau = cfg.tau_start
        elif d.learn_assignment:
            d.freeze_assignment()
    groups_named = set_trainable(base, cfg.group_lrs(), learn_assignment)
    lrs = cfg.group_lrs()
    # LapSum checkpoints: learned per-layer budgets k_l = softmax(eta)_l (K - L) + 1 (SoftMoE)
    lapsum = [d for d in dots.values() if d.router_type == "lapsum"]
    eta = nn.Parameter(torch.zeros(len(lapsum), device=dev), requires_grad=cfg.learn_budget and len(lapsum) > 1)
    total_budget = cfg.total_budget if cfg.total_budget is not None else sum(float(d.k_budget) for d in lapsum)
    param_groups = []
    for g, named in groups_named.items():
        if named:
            decay = cfg.weight_decay if g in ("experts", "attention", "lm_head", "other") else 0.0
            param_groups.append({"params": [p for _, p in named], "lr": lrs[g], "base_lr": lrs[g], "name": g, "weight_decay": decay})
    if eta.requires_grad:
        param_groups.append({"params": [eta], "lr": cfg.lr_budget, "base_lr": cfg.lr_budget, "name": "budget", "weight_decay": 0.0})
    tracked = {n: p for g in groups_named.values() for n, p in g}
    tracked["budget.eta"] = eta
    n_trainable = sum(p.numel() for n, p in tracked.items() if p.requires_grad)
    module = DistillModule(student, cfg)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.AdamW(param_groups, betas=cfg.betas, eps=1e-8)
    module, opt = accelerator.prepare(module, opt)
    raw_module = accelerator.unwrap_model(module)

    def set_budgets(detach: bool = False) -> None:
        if not lapsum:
            return
        from ..lapsum import layer_budgets

        k_l = layer_budgets(eta, total_budget) if eta.requires_grad else torch.full((len(lapsum),), total_budget / len(lapsum))
        for j, d in enumerate(lapsum):
            d.k_budget = float(k_l[j].detach()) if detach else k_l[j]

    groups = (held_out or data).val_groups()
    val_ids = torch.cat([r for _, r in groups]) if groups else None

    @torch.no_grad()
    def recalibrate() -> None:
        if not lapsum:
            return
        set_budgets(detach=True)
        ids = val_ids if val_ids is not None else data.rows(0, min(4, cfg.batch_size))
        xs: dict[int, torch.Tensor] = {}
        handles = [d.register_forward_hook(lambda m, a, o, j=j: xs.__setitem__(j, a[0].reshape(-1, a[0].shape[-1]).detach()))
                   for j, d in enumerate(lapsum)]
        _backbone(base)(input_ids=ids[: cfg.batch_size].to(dev), use_cache=False)
        for h in handles:
            h.remove()
        for j, d in enumerate(lapsum):
            d.calibrate_threshold(xs[j])

    @torch.no_grad()
    def evaluate(step: int) -> dict[str, Any]:
        """Held-out KL, perplexity and loss (the trained objective's KL and CE terms) with hard
        routing (what the exported model computes); per held-out set when there are several."""
        recalibrate()
        raw_module.eval()
        kl = ce = 0.0
        n = 0
        per_set: dict[str, Any] = {}
        loads: list[torch.Tensor] = []
        hooks = [d.register_forward_hook(lambda m, a, o: loads.append(m.aux["hard"].reshape(-1, m.n_experts).float().mean(0).cpu()))
                 for d in dots.values() if d.n_experts > 0]
        for name, rows in groups:
            gkl = gce = 0.0
            gn = 0
            for j in range(0, rows.shape[0], cfg.batch_size):
                ids = rows[j : j + cfg.batch_size].to(dev)
                with accelerator.autocast():
                    th = teacher.hidden(ids)
                    _, st = raw_module(ids, th, teacher.head, teacher.softcap)
                gkl += st["kl"] * ids.numel()
                gce += st["ce"] * ids.numel()
                gn += ids.numel()
            if len(groups) > 1:
                per_set[f"val_kl/{name}"], per_set[f"val_ppl/{name}"] = gkl / gn, math.exp(gce / gn)
            kl, ce, n = kl + gkl, ce + gce, n + gn
        for h in hooks:
            h.remove()
        extra = extra_eval(base) if extra_eval is not None else {}
        raw_module.train()
        n_layers = max(1, sum(1 for d in dots.values() if d.n_experts > 0))
        per_layer = [torch.stack(loads[i::n_layers]).mean(0).tolist() for i in range(n_layers)] if loads else []
        return {"step": step, "val_kl": kl / n, "val_ppl": math.exp(ce / n),
                "val_loss": cfg.kl_weight * kl / n + cfg.ce_weight * ce / n, **per_set, **extra, "expert_load": per_layer}

    def snapshot() -> dict[str, torch.Tensor]:
        """What training changes: trainable tensors, learned assignments, LapSum thresholds."""
        snap = {f"p.{n}": p.detach().clone() for n, p in tracked.items()}
        for i, d in dots.items():
            snap[f"assign.{i}"] = d.hard_assignment().detach().clone()
            snap[f"threshold.{i}"] = d.threshold.detach().clone()
        return snap

    def restore(snap: dict[str, torch.Tensor], assignments_final: bool) -> None:
        with torch.no_grad():
            for n, p in tracked.items():
                p.copy_(snap[f"p.{n}"].to(p.device))
            for i, d in dots.items():
                d.threshold.copy_(snap[f"threshold.{i}"])
                if assignments_final:  # a kept state: its hard assignment is the one to export
                    d.fixed_assign.copy_(snap[f"assign.{i}"].to(d.fixed_assign.device))
                    d.learn_assignment = False
                    d.affinity.requires_grad_(False)

    def full_state() -> dict[str, torch.Tensor]:
        st = {f"p.{n}": p for n, p in tracked.items()}
        tracked_ids = {id(p) for p in tracked.values()}
        for i, d in dots.items():
            if id(d.affinity) not in tracked_ids:
                st[f"affinity.{i}"] = d.affinity
            st[f"fixed_assign.{i}"] = d.fixed_assign
            st[f"threshold.{i}"] = d.threshold
        return st

    history: list[dict[str, Any]] = []
    losses: list[float] = []
    best: dict[str, torch.Tensor] = {}
    best_score = math.inf
    best_step: int | None = None
    start = 0
    tokens_done = 0
    train_seconds = 0.0
    resumed = state.load()
    if resumed is not None:
        meta, tensors, best, opt_state, rng = resumed
        with torch.no_grad():
            for k, p in full_state().items():
                p.copy_(tensors[k].to(p.device))
        for i, d in dots.items():
            d.learn_assignment = bool(meta["learn_assignment"][str(i)])
            d.affinity.requires_grad_(d.learn_assignment and learn_assignment)
            d.tau = float(meta["tau"])
        _inner(opt).load_state_dict(opt_state)
        torch.set_rng_state(rng)
        start, tokens_done, history = int(meta["step"]), int(meta["tokens"]), list(meta["history"])
        best_score, best_step, train_seconds = float(meta["best_score"]), meta["best_step"], float(meta["train_seconds"])
        losses = list(meta["losses"])
        log(f"resuming training at step {start} of {steps} ({tokens_done} tokens done)")
        if metrics_path is not None and main and metrics_path.is_file():  # drop lines past the checkpoint
            lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start]
            metrics_path.write_text("".join(ln + "\n" for ln in lines))
    elif metrics_path is not None and main:
        metrics_path.write_text("")

    def write_metrics(row: dict[str, Any]) -> None:
        if metrics_path is not None and main:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def consider(ev: dict[str, Any]) -> None:
        nonlocal best_score, best_step, best
        history.append(ev)
        write_metrics({"tokens": ev["step"] * cfg.seq_len * cfg.batch_size * cfg.grad_accum * world, **ev})
        if not math.isfinite(ev["val_kl"]):
            raise NonFiniteLossError(f"non-finite held-out KL at step {ev['step']}; lower the learning rates")
        if cfg.keep_best and selection_score(ev, cfg.select_by) < best_score:
            best_score, best_step = selection_score(ev, cfg.select_by), ev["step"]
            best = snapshot()

    set_budgets(detach=not eta.requires_grad)
    raw_module.train()
    if start == 0 and val_ids is not None:
        ev = evaluate(0)
        consider(ev)
        log(f"step 0: held-out KL {ev['val_kl']:.4f}, PPL {ev['val_ppl']:.2f}")
    group_desc = ", ".join(f"{g['name']} {g['lr']:g}" for g in param_groups)
    log(f"training {n_trainable / 1e6:.2f}M parameters ({group_desc}) "
        f"for {steps} steps x {cfg.batch_size * cfg.grad_accum * world} x {cfg.seq_len} tokens on {dev} x {world}")
    t_loop = time.time()
    trainable_params = [p for g in param_groups for p in g["params"]]
    for step in range(start, steps):
        t_step = time.time()
        if learn_assignment and step < anneal_steps:
            tau = geometric_schedule(cfg.tau_start, cfg.tau_end, step, max(1, anneal_steps - 1))
            for d in dots.values():
                d.tau = tau
        elif learn_assignment and step == anneal_steps:
            for d in dots.values():
                if d.learn_assignment:
                    d.freeze_assignment()
        if lapsum and step % cfg.lapsum_recalibrate_every == 0:
            recalibrate()
        factor = lr_factor(step, steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * factor
        sums = {"loss": 0.0, "kl": 0.0, "ce": 0.0, "z_loss": 0.0, "balance": 0.0}
        for micro in range(cfg.grad_accum):
            set_budgets()
            ids = data.batch(step, micro, cfg.grad_accum, world, rank, cfg.batch_size).to(dev)
            with accelerator.autocast():
                if teacher_cache is not None:  # the teacher's top-k distributions, computed once per sequence
                    loss, st = module(ids, teacher_cache.targets(ids, teacher.logp_rows), None, None)
                else:
                    loss, st = module(ids, teacher.hidden(ids), teacher.head, teacher.softcap)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"non-finite training loss at step {step}; lower the learning rates")
            sync = micro == cfg.grad_accum - 1
            ctx = accelerator.no_sync(module) if not sync else _null()
            with ctx:
                accelerator.backward(loss / cfg.grad_accum)
            sums["loss"] += float(loss.detach()) / cfg.grad_accum
            for k in ("kl", "ce", "z_loss", "balance"):
                sums[k] += st.get(k, 0.0) / cfg.grad_accum
        if world > 1:  # the logged figures are means over all processes' sequences
            vals = accelerator.reduce(torch.tensor([sums[k] for k in sorted(sums)], device=dev), reduction="mean")
            sums = dict(zip(sorted(sums), vals.tolist()))
        grad_norm = float(accelerator.clip_grad_norm_(trainable_params, cfg.clip)) if cfg.clip > 0 else float("nan")
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens_done += cfg.seq_len * cfg.batch_size * cfg.grad_accum * world
        losses.append(sums["kl"])
        train_seconds += time.time() - t_step
        done = step + 1
        row = {"step": done, "tokens": tokens_done, "lr": factor, **{k: round(v, 6) for k, v in sums.items()},
               "grad_norm": round(grad_norm, 4), "tau": dots[next(iter(dots))].tau if learn_assignment else None,
               "tokens_per_s": round(tokens_done / max(train_seconds, 1e-9), 2)}
        write_metrics(row)
        if val_ids is not None and (done % cfg.eval_every == 0 or done == steps):
            ev = evaluate(done)
            consider(ev)
            row.update(val_kl=ev["val_kl"], val_ppl=ev["val_ppl"])
        if report is not None:
            report({**row, "steps": steps, "elapsed": time.time() - t_loop})
        if done % cfg.checkpoint_every == 0 and done < steps:
            meta = {"tokens": tokens_done, "history": history, "losses": losses, "best_score": best_score, "best_step": best_step,
                    "train_seconds": train_seconds, "tau": dots[next(iter(dots))].tau,
                    "learn_assignment": {str(i): bool(d.learn_assignment) for i, d in dots.items()}}
            if main:
                state.save(done, full_state() | ({"budget.eta": eta} if lapsum else {}), best, _inner(opt), meta)
            accelerator.wait_for_everyone()
            if os.environ.get(KILL_AFTER_STEP) == str(done):
                os.kill(os.getpid(), signal.SIGKILL)
    # the state to export
    if best and best_step is not None and best_step != steps:
        restore(best, assignments_final=True)
        last = selection_score(history[-1], cfg.select_by) if history else math.nan
        what = "the layer-wise model, untrained" if best_step == 0 else f"step {best_step}"
        log(f"warning: keeping {what}: held-out {SELECT_BY[cfg.select_by]} {best_score:.4f} against {last:.4f} at the last "
            f"step {steps} (select with --select-by loss|kl|ppl)")
    set_budgets(detach=True)
    out = TrainOutcome(
        steps=steps, tokens=tokens_done, history=history, best_step=best_step,
        neurons_moved=student.neurons_moved(), tokens_per_second=tokens_done / max(train_seconds, 1e-9),
        peak_rss_mib=_peak_rss_mib(), seconds=time.time() - t_start, losses=losses,
    )
    if torch.cuda.is_available() and dev.type == "cuda":
        out.peak_gpu_mib = torch.cuda.max_memory_allocated(dev) / 2**20
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_disable()
    return out


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _inner(opt: Any) -> torch.optim.Optimizer:
    return getattr(opt, "optimizer", opt)


def plot_curve(history: list[dict[str, Any]], tokens_per_step: int, out: Path, title: str) -> None:
    """Held-out perplexity against training tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [h["step"] * tokens_per_step for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [h["val_ppl"] for h in history], marker="o")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out perplexity")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
