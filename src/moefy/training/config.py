"""Recovery-training settings: one dataclass, validated once, readable from a YAML recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .student import GROUPS

# Learning rates per parameter group (0 freezes a group). The whole network trains except the
# embeddings (tied to the LM head in most small models, which then stays frozen too).
DEFAULT_LRS: dict[str, float] = {
    "experts": 1e-4, "routers": 1e-3, "assignment": 0.1, "attention": 1e-4, "norms": 1e-4,
    "embeddings": 0.0, "lm_head": 1e-4, "other": 1e-4,
}


@dataclass
class TrainConfig:
    """Everything that decides the trained model, plus how it is run."""

    tokens: int = 100_000  # training tokens (global, all processes)
    seq_len: int = 512
    batch_size: int = 4  # sequences per process and micro-batch
    grad_accum: int = 1
    lrs: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_LRS))
    lr_scale: float = 1.0  # multiplies every group's learning rate
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of each group's rate
    clip: float = 1.0
    # loss: KL(teacher || student) + CE + router z-loss + load balance
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    z_loss_weight: float = 1e-3
    balance_weight: float = 1e-2
    loss_chunk: int = 1024  # tokens per chunk of the vocabulary-sized loss
    # assignment: with learn_assignment, the Sinkhorn temperature anneals geometrically over
    # anneal_fraction of the steps, then the assignment is frozen (no neuron moves once it is
    # hard). Off by default: on stories260K, moving neurons during recovery training scored worse
    # on held-out KL than keeping the layer-wise split (docs/BENCHMARKS.md section 7).
    learn_assignment: bool = False
    tau_start: float = 1.0
    tau_end: float = 0.1
    anneal_fraction: float = 0.5
    affinity_margin: float = 3.0
    # held-out evaluation and keep-best
    val_sequences: int = 16
    eval_every: int = 25
    keep_best: bool = True
    # what keep-best minimises on the held-out text: loss (kl_weight KL + ce_weight CE, the
    # objective trained), kl, or ppl.  With the CE term on, held-out KL can rise while PPL falls
    # (docs/BENCHMARKS.md), so selecting by KL alone threw such trainings away.
    select_by: str = "loss"
    # the teacher's top-k distributions cached on disk per sequence and reused across epochs and
    # runs (moefy.training.teacher_cache); None: the live teacher at every step
    teacher_cache: str | None = None
    cache_top_k: int = 64
    # running
    checkpoint_every: int = 25
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | bf16 | fp16
    shuffle_window: int = 1024
    seed: int = 0
    # LapSum checkpoints: re-calibrate truncation thresholds every this many steps
    lapsum_recalibrate_every: int = 10
    learn_budget: bool = False  # LapSum: learned per-layer budgets k_l (SoftMoE)
    total_budget: float | None = None
    lr_budget: float = 0.05

    @property
    def global_batch_sequences(self) -> int:
        return self.batch_size * self.grad_accum

    def steps(self, world: int = 1) -> int:
        return max(1, self.tokens // (self.seq_len * self.batch_size * self.grad_accum * world))

    def group_lrs(self) -> dict[str, float]:
        return {g: self.lrs.get(g, 0.0) * self.lr_scale for g in GROUPS}

    def validate(self) -> None:
        for g in self.lrs:
            if g not in GROUPS:
                raise ConfigError(f"unknown parameter group {g!r}; groups are {', '.join(GROUPS)}")
        if any(v < 0 for v in self.lrs.values()) or self.lr_scale < 0:
            raise ConfigError("learning rates must be >= 0 (0 freezes a group)")
        if not any(v > 0 for v in self.group_lrs().values()):
            raise ConfigError("every parameter group is frozen: nothing to train")
        if self.tokens <= 0:
            raise ConfigError(f"--tokens must be positive, got {self.tokens}")
        if self.seq_len < 8:
            raise ConfigError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("--batch-size and --grad-accum must be at least 1")
        if self.tokens < self.seq_len * self.batch_size * self.grad_accum:
            raise ConfigError(
                f"--tokens {self.tokens} is fewer than one batch ({self.batch_size} x {self.grad_accum} x {self.seq_len} tokens)"
            )
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ConfigError(f"unknown --mixed-precision {self.mixed_precision!r}; choose auto, no, bf16 or fp16")
        if not (0 < self.tau_end <= self.tau_start):
            raise ConfigError("temperatures must satisfy 0 < tau_end <= tau_start")
        if not 0 <= self.anneal_fraction <= 1:
            raise ConfigError("anneal_fraction must be within 0..1")
        if self.val_sequences < 0 or self.eval_every < 1 or self.checkpoint_every < 1:
            raise ConfigError("val_sequences must be >= 0, eval_every and checkpoint_every >= 1")
        if self.cache_top_k < 1:
            raise ConfigError(f"--cache-top-k must be at least 1, got {self.cache_top_k}")
        if self.select_by not in ("loss", "kl", "ppl"):
            raise ConfigError(f"unknown --select-by {self.select_by!r}; choose loss, kl or ppl")
        if self.loss_chunk < 1:
            raise ConfigError("loss_chunk must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown training setting(s): {', '.join(unknown)}")
        d = dict(d)
        if "lrs" in d:
            d["lrs"] = {**DEFAULT_LRS, **{str(k): float(v) for k, v in d["lrs"].items()}}
        if "betas" in d:
            d["betas"] = tuple(float(b) for b in d["betas"])
        return cls(**d)


def load_recipe(path: Path) -> dict[str, Any]:
    """A YAML recipe: ``{train: {...TrainConfig fields...}, data: [...], teacher: ..., ...}``."""
    from ..config import read_yaml

    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping")
    return data
