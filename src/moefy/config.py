"""Conversion settings, validated once, recorded in ``moefy.json``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, TooFewExpertsError, TooManyExpertsError, TopKTooLargeError, TopKTooSmallError

DTYPES = ("bf16", "fp16", "fp32")
DEVICES = "cpu, cuda, cuda:N or auto"
METHODS = ("dot", "dot-frozen", "random", "param-cluster", "act-cluster", "prune")
STAGES = ("layerwise", "e2e", "both")
WEIGHT_MODES = ("none", "ridge", "grad", "grad+ridge", "ridge+grad")
RIDGE_GAMMAS = (1e-3, 1e-2, 1e-1, 1.0)  # the held-out choice of the ridge refit's strength
INITS = ("act-cluster", "param-cluster", "random", "best")
# --init best: each layer starts from whichever of these splits scores lower on held-out tokens
BEST_INIT_CANDIDATES = ("act-cluster", "param-cluster")
# --drift-correction when not given, for layouts with shared neurons (docs/BENCHMARKS.md 6.9)
DEFAULT_DRIFT_CORRECTION = 0.5
# the layout fields --active chooses (moefy.layouts.layout_for) unless given explicitly
# --allocate: how shared neurons are spread over the layers (moefy.allocation)
ALLOCATIONS = ("uniform", "kl")
LAYOUT_FIELDS = ("n_experts", "top_k", "n_shared", "shared_by")
SHARED_BY_RULES = ("rate", "importance", "obs")


@dataclass
class ConvertConfig:
    """Everything that decides the converted model (and nothing that does not)."""

    n_experts: int = 8
    top_k: int = 2
    method: str = "dot"
    n_shared: int = 0
    # shared neurons: "rate" (CMoE: most often active) | "importance" (|activation| x down norm) |
    # "obs" (greedy structured Optimal Brain Surgeon on the layer's target: splits.obs_order);
    # with --method prune, "obs" also picks the kept neurons
    shared_by: str = "rate"
    # how the shared neurons are spread over the layers: "uniform" (n_shared in every layer) or "kl"
    # (moefy.allocation: measured per layer on the calibration text, the mean kept at n_shared);
    # shared_per_layer, one count per decoder layer, is what "kl" chose (a recipe that gives it
    # reproduces the conversion without measuring again)
    allocate: str = "uniform"
    shared_per_layer: list[int] | None = None
    # the measurement of --allocate kl uses at most this many of the calibration tokens (the first
    # ones): its cost then does not grow with --calib-tokens (docs/BENCHMARKS.md 6.12)
    allocate_tokens: int = 16384
    stage: str = "layerwise"
    seed: int = 0
    # calibration
    calib_tokens: int = 32768
    seq_len: int = 512
    val_fraction: float = 0.125
    # layer-wise training
    steps: int = 40
    batch_tokens: int = 2048
    lr_affinity: float = 0.05
    lr_router: float = 3e-3
    tau_start: float = 1.0
    tau_end: float = 0.05
    sinkhorn_iters: int = 30
    rounding: str = "greedy"
    init: str = "act-cluster"
    z_loss_weight: float = 1e-3
    balance_weight: float = 1e-2
    eval_every: int = 10
    ls_router_eval: bool = True  # DOT-MoE: score each assignment with a refitted least-squares router too
    # which fit a layer keeps: "layer" (held-out layer error, the recipe's own choices) or "model" (the
    # trained fit or the fit from the initial split, whichever gives the lower held-out KL of the
    # model's logits; moefy.model_select)
    select: str = "layer"
    weights: str = "ridge"
    # ridge refit's pull toward the dense W_down (lam = gamma x mean diag of the Gram matrix): None
    # chooses gamma per layer on held-out calibration tokens from RIDGE_GAMMAS; a number fixes it
    ridge_gamma: float | None = None
    weight_steps: int = 150
    # layer loss: "clip" caps each token's share of ||y||^2 at token_clip x the median token
    # (outlier "massive activation" tokens otherwise own 80-99% of the loss in some layers)
    token_weighting: str = "none"
    token_clip: float = 16.0
    # layer targets: 0 fits each FFN to the dense FFN's output on its own (MoE-path) inputs, as
    # llm-compressor's sequential pipeline does; a > 0 adds a x the drift of the residual stream
    # from the dense model's (dense-model stream after the layer minus the MoE stream's), so each
    # layer also undoes part of the error the converted layers below left (moefy.convert).
    # None: DEFAULT_DRIFT_CORRECTION for layouts with shared neurons where the FFN's output is
    # added to the residual stream as it is, else 0 (moefy.convert.drift_correction_for)
    drift_correction: float | None = None
    # --weights grad's Adam step size; recipes/convert-smollm2-50-fine.yaml sets 2e-4, where 22 of 30
    # layers still ran the full weight_steps (docs/BENCHMARKS.md 6.13)
    lr_weights: float = 1e-4
    # end-to-end stage: recovery training (moefy.training) of the whole network against the
    # dense model, on the calibration files past the calibration tokens (or --train-data)
    e2e_steps: int = 100
    e2e_batch: int = 4
    e2e_lr_affinity: float = 0.05
    e2e_lr_router: float = 1e-3
    e2e_lr_weights: float = 1e-4  # expert gate/up/down
    e2e_lr_rest: float = 1e-4  # attention, norms, LM head (embeddings stay frozen)
    e2e_checkpoint_every: int = 25
    e2e_learn_assignment: bool = False  # dot: let the Sinkhorn assignment move neurons (opt-in; see moefy.training.config)
    # end-to-end keep-best: KL on this many held-out sequences (taken from the training text,
    # never trained on, disjoint from the calibration tokens) every e2e_eval_every steps; the
    # best state (the layer-wise result included) is kept. 0 disables it.
    e2e_val_sequences: int = 4
    e2e_eval_every: int = 10
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    layers: list[int] | None = field(default=None)
    # routing (SoftMoE): "topk" (hard top-k, STE) or "lapsum" (truncated LapSum soft top-k)
    router: str = "topk"
    gating: str = "mask"  # top-k: "mask" (paper), "softmax" (Qwen2-MoE, norm_topk_prob False) or "softmax-renorm" (Mixtral)
    budget: float | None = None  # LapSum: total mean active experts over all converted layers (K)
    budget_mode: str = "learned"  # LapSum: "learned" (k_l = softmax(eta)_l (K - L) + 1, e2e) or "fixed" (K/L)
    max_active: int | None = None  # LapSum: cap on experts a token may use
    lr_budget: float = 0.05
    # --active FRACTION: the measured-best layout for that active FFN fraction, scaled to the
    # model's d_ffn once it is loaded (resolve_layout); the LAYOUT_FIELDS named in
    # explicit_layout were given explicitly and keep their values
    active: float | None = None
    explicit_layout: list[str] = field(default_factory=list)
    # weights and carried activations: "bf16" | "fp16" | "fp32"; None: the checkpoint's own dtype
    # (fp32 for GGUF and for the end-to-end stage, which trains in fp32); fitting runs in fp32
    dtype: str | None = None

    def resolve_layout(self, d_ffn: int, overrides: Iterable[str] | None = None) -> ConvertConfig:
        """This config with ``--active``'s layout for an FFN of ``d_ffn`` neurons filled in: the
        layout fields not in ``overrides`` (default: ``explicit_layout``) come from
        :func:`moefy.layouts.layout_for`.  Without ``active``: this config unchanged."""
        if self.active is None:
            return self
        from .layouts import layout_for

        keep = set(self.explicit_layout if overrides is None else overrides)
        unknown = keep - set(LAYOUT_FIELDS)
        if unknown:
            raise ConfigError(f"not a layout field: {', '.join(sorted(unknown))}; choose from {', '.join(LAYOUT_FIELDS)}")
        lay = layout_for(self.active, d_ffn)
        picked = {"n_experts": lay.n_experts, "top_k": lay.top_k, "n_shared": lay.n_shared, "shared_by": lay.shared_by}
        return replace(self, **{k: v for k, v in picked.items() if k not in keep}, explicit_layout=sorted(keep))

    def validate(self, d_ffn: int | None = None) -> None:
        if self.active is not None:
            if isinstance(self.active, bool) or not isinstance(self.active, (int, float)) or not 0 < self.active < 1:
                raise ConfigError(f"--active must be a fraction strictly between 0 and 1, got {self.active!r}")
            bad = set(self.explicit_layout) - set(LAYOUT_FIELDS)
            if bad:
                raise ConfigError(f"explicit_layout names {', '.join(sorted(bad))}; choose from {', '.join(LAYOUT_FIELDS)}")
            if d_ffn is None:  # the layout is known only with the model's d_ffn: check what was given
                self._validate_partial_layout()
                return
        if self.n_experts < 2:
            raise TooFewExpertsError(f"--experts must be at least 2, got {self.n_experts}")
        if self.top_k < 1:
            raise TopKTooSmallError(f"--top-k must be at least 1, got {self.top_k}")
        if self.top_k > self.n_experts:
            raise TopKTooLargeError(f"--top-k {self.top_k} is larger than --experts {self.n_experts}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown --method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.stage not in STAGES:
            raise ConfigError(f"unknown --stage {self.stage!r}; choose one of {', '.join(STAGES)}")
        if self.weights not in WEIGHT_MODES:
            raise ConfigError(f"unknown --weights {self.weights!r}; choose one of {', '.join(WEIGHT_MODES)}")
        if self.ridge_gamma is not None and (
            isinstance(self.ridge_gamma, bool) or not isinstance(self.ridge_gamma, (int, float)) or not self.ridge_gamma > 0
        ):
            raise ConfigError(f"ridge_gamma must be a positive number (or unset: chosen on held-out tokens), got {self.ridge_gamma!r}")
        if self.drift_correction is not None and (
            isinstance(self.drift_correction, bool) or not isinstance(self.drift_correction, (int, float))
            or not 0 <= self.drift_correction <= 1
        ):
            raise ConfigError(f"--drift-correction must be a number in [0, 1], got {self.drift_correction!r}")
        if self.shared_by not in SHARED_BY_RULES:
            raise ConfigError(f"unknown --shared-by {self.shared_by!r}; choose {', '.join(SHARED_BY_RULES)}")
        if self.token_weighting not in ("clip", "none"):
            raise ConfigError(f"unknown token weighting {self.token_weighting!r}; choose clip or none")
        if self.init not in INITS:
            raise ConfigError(f"unknown --init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.rounding not in ("greedy", "exact"):
            raise ConfigError(f"unknown --rounding {self.rounding!r}; choose greedy or exact")
        if self.router not in ("topk", "lapsum"):
            raise ConfigError(f"unknown --router {self.router!r}; choose topk or lapsum")
        if self.select not in ("layer", "model"):
            raise ConfigError(f"unknown --select {self.select!r}; choose layer or model")
        if self.gating not in ("mask", "softmax", "softmax-renorm"):
            raise ConfigError(f"unknown --gating {self.gating!r}; choose mask, softmax or softmax-renorm")
        if self.budget_mode not in ("learned", "fixed"):
            raise ConfigError(f"unknown --budget-mode {self.budget_mode!r}; choose learned or fixed")
        if self.max_active is not None and not 1 <= self.max_active <= self.n_experts:
            raise ConfigError(f"--max-active must be within 1..{self.n_experts}")
        if self.e2e_val_sequences < 0:
            raise ConfigError(f"--e2e-val-sequences must be >= 0, got {self.e2e_val_sequences}")
        if self.e2e_eval_every < 1:
            raise ConfigError(f"e2e_eval_every must be >= 1, got {self.e2e_eval_every}")
        if self.n_shared < 0:
            raise ConfigError(f"--shared must be >= 0, got {self.n_shared}")
        if self.allocate not in ALLOCATIONS:
            raise ConfigError(f"unknown --allocate {self.allocate!r}; choose {' or '.join(ALLOCATIONS)}")
        if self.allocate != "uniform" and self.n_shared == 0:
            raise ConfigError(f"--allocate {self.allocate} moves shared neurons between layers, and this layout has none; "
                              "give --shared N (or --active)")
        if self.allocate != "uniform" and self.method == "prune":
            raise ConfigError(f"--allocate {self.allocate} needs a routed layout with shared neurons, not --method prune")
        if self.allocate != "uniform" and self.allocate_tokens < self.seq_len:
            raise ConfigError(f"--allocate-tokens {self.allocate_tokens} is less than one sequence of --seq-len {self.seq_len}")
        if self.shared_per_layer is not None and any(v < 0 for v in self.shared_per_layer):
            raise ConfigError(f"shared_per_layer counts must be >= 0, got {self.shared_per_layer}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.dtype not in (None, "fp32") and self.stage != "layerwise":
            raise ConfigError(f"--stage {self.stage} trains the whole model in fp32; use --dtype fp32 (or leave --dtype out)")
        if self.seq_len < 8:
            raise ConfigError(f"--seq-len must be at least 8, got {self.seq_len}")
        if self.calib_tokens < self.seq_len:
            raise ConfigError(f"--calib-tokens {self.calib_tokens} is less than one sequence of --seq-len {self.seq_len}")
        if d_ffn is not None:
            if self.n_experts + self.n_shared > d_ffn:
                raise TooManyExpertsError(
                    f"--experts {self.n_experts} (+ {self.n_shared} shared) exceeds the FFN width d_ffn={d_ffn}"
                )
            if self.shared_per_layer is not None and self.n_experts + max(self.shared_per_layer, default=0) > d_ffn:
                raise TooManyExpertsError(
                    f"--experts {self.n_experts} (+ {max(self.shared_per_layer)} shared in one layer of shared_per_layer) "
                    f"exceeds the FFN width d_ffn={d_ffn}"
                )

    def for_layer(self, i: int) -> ConvertConfig:
        """The settings decoder layer ``i`` is converted with: ``n_shared`` from ``shared_per_layer``
        where that is set, else these."""
        if self.shared_per_layer is None:
            return self
        return replace(self, n_shared=int(self.shared_per_layer[i]))

    def _validate_partial_layout(self) -> None:
        """``validate`` before ``resolve_layout``: the layout fields given, and everything else."""
        given = set(self.explicit_layout)
        picked = replace(self, active=None, explicit_layout=[])
        # stand-ins for the fields --active will choose, so only the given ones can fail
        if "n_experts" not in given:
            picked.n_experts = max(2, picked.top_k if "top_k" in given else 2, picked.max_active or 2)
        if "top_k" not in given:
            picked.top_k = 1
        if "n_shared" not in given:  # --allocate needs shared neurons: checked again once --active has chosen them
            picked.n_shared = 0 if self.allocate == "uniform" else 1
        if "shared_by" not in given:
            picked.shared_by = "importance"
        picked.validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(name: str) -> Any:
    """``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (the first CUDA device when there is
    one, else the CPU) as a ``torch.device``; a device this machine lacks is a one-line ConfigError."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown --device {name!r}; choose {DEVICES}") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise ConfigError(f"unsupported --device {name!r}; choose {DEVICES}")
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "without CUDA"
        raise ConfigError(f"--device {name}: no CUDA device is available (torch {torch.__version__}, built {build}); use --device cpu")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _type_ok(name: str, value: Any) -> bool:
    """Does a recipe's ``value`` fit ConvertConfig field ``name`` (judged by its default)?"""
    if name in ("layers", "shared_per_layer"):
        return value is None or (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
    if name == "dtype":
        return value is None or isinstance(value, str)
    if name in ("budget", "active", "drift_correction"):
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if name == "max_active":
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    default = getattr(ConvertConfig(), name)
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


# the ConvertConfig fields a recipe may set (explicit_layout follows from which layout fields it sets)
CONFIG_FIELDS = tuple(f.name for f in fields(ConvertConfig) if f.name != "explicit_layout")
# a convert recipe's keys beyond the ConvertConfig fields
RECIPE_JOB_KEYS = ("model", "out", "calib", "train_data", "overwrite")


@dataclass
class ConvertRecipe:
    """A whole conversion, as ``moefy convert --recipe FILE`` reads it: the job (model, out,
    calibration and end-to-end text) and any :class:`ConvertConfig` fields.  Hyphens in keys
    read as underscores (``top-k`` = ``top_k``); the command line's flags override it."""

    model: str | None = None
    out: str | None = None
    calib: list[str] | None = None
    train_data: list[str] | None = None
    overwrite: bool | None = None
    config: dict[str, Any] = field(default_factory=dict)


def read_yaml(path: str | Path) -> Any:
    """The parsed YAML of a recipe file (``convert`` and ``train``); a missing file or bad YAML
    is one line of :class:`ConfigError`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from None


def load_convert_recipe(path: str | Path) -> ConvertRecipe:
    """Read and check a convert recipe (YAML); any problem is one line of :class:`ConfigError`."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path} must be a mapping of settings, got {type(data).__name__}")
    items = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = [k for k in items if k not in CONFIG_FIELDS and k not in RECIPE_JOB_KEYS]
    if unknown:
        raise ConfigError(
            f"recipe {path}: unknown key(s) {', '.join(sorted(unknown))}; use model, out, calib, train_data, "
            "overwrite or a ConvertConfig field (e.g. n_experts, top_k, n_shared, shared_by, active, calib_tokens)"
        )
    recipe = ConvertRecipe()
    for key in ("model", "out"):
        if key in items and items[key] is not None:
            if not isinstance(items[key], str):
                raise ConfigError(f"recipe {path}: {key} must be a string, got {items[key]!r}")
            setattr(recipe, key, items[key])
    for key in ("calib", "train_data"):
        if key in items and items[key] is not None:
            value = [items[key]] if isinstance(items[key], (str, dict)) else items[key]
            if not isinstance(value, list) or not all(isinstance(v, (str, dict)) for v in value):
                raise ConfigError(f"recipe {path}: {key} must be a source or a list of sources, got {items[key]!r}")
            from .mixture import parse_spec

            # a mapping {path: FILE, weight: W} or {teacher: true, weight: W} reads as FILE@W
            setattr(recipe, key, [str(parse_spec(v)) if isinstance(v, dict) else v for v in value])
    if "overwrite" in items:
        if not isinstance(items["overwrite"], bool):
            raise ConfigError(f"recipe {path}: overwrite must be true or false, got {items['overwrite']!r}")
        recipe.overwrite = items["overwrite"]
    for key, value in items.items():
        if key in CONFIG_FIELDS:
            if not _type_ok(key, value):
                raise ConfigError(f"recipe {path}: {key} has the wrong type: {value!r}")
            recipe.config[key] = value
    return recipe
