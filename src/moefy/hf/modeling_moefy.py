"""Modeling code of a moefy Mixture-of-Experts checkpoint (self-contained: torch + transformers only).

A converted model is the dense base model with each chosen decoder layer's gated FFN replaced
by :class:`MoefyMLP`: the FFN's neurons are permuted so that ``n_shared`` always-active
neurons come first and each routed expert's neurons follow contiguously, so an expert is a
row slice of ``gate_proj``/``up_proj`` and a column slice of ``down_proj`` (a view, no copy).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN

try:  # relative import inside an exported checkpoint (trust_remote_code)
    from .configuration_moefy import MoefyConfig
except ImportError:  # pragma: no cover - plain import when vendored elsewhere
    from configuration_moefy import MoefyConfig  # type: ignore[no-redef]


def _laplace_cdf(z: torch.Tensor) -> torch.Tensor:
    return torch.where(z < 0, 0.5 * torch.exp(z.clamp(max=0)), 1 - 0.5 * torch.exp(-z.clamp(min=0)))


def lapsum_threshold_bisect(scores: torch.Tensor, k: float, alpha: float, iters: int = 60) -> torch.Tensor:
    """Threshold ``t`` (per row) with ``sum_i F((s_i - t)/alpha) = k`` by bisection (inference only)."""
    lo = scores.min(dim=-1, keepdim=True).values - 50 * alpha
    hi = scores.max(dim=-1, keepdim=True).values + 50 * alpha
    for _ in range(iters):
        mid = (lo + hi) / 2
        total = _laplace_cdf((scores - mid) / alpha).sum(dim=-1, keepdim=True)
        lo = torch.where(total > k, mid, lo)
        hi = torch.where(total > k, hi, mid)
    return (lo + hi) / 2


# --------------------------------------------------------------------------- batch-1 decode
# Decode is memory-bound: its speed is how fast the chosen experts' weights stream from memory.
# On CPU, moefy's compiled kernel (moefy.kernels: every active neuron's gate/up/down rows read
# once, contiguous, in one parallel region on torch's own threads) reaches the bytes limit at
# every expert granularity (docs/BENCHMARKS.md section 4); without it (moefy not importable, as
# in a trust_remote_code load, or no compiler) the same ranges run as PyTorch GEMV calls.
# Half-precision prefill on CPU: experts with at least this many tokens compute in fp32, since
# PyTorch's CPU bf16/fp16 GEMM without native half instructions is several times slower.
HALF_UPCAST_MIN_TOKENS = 16

try:
    from moefy import kernels as _kernels
except ImportError:  # pragma: no cover - a checkpoint loaded without moefy installed
    _kernels = None  # type: ignore[assignment]


class MoefyMLP(nn.Module):
    """Gated FFN split into ``n_shared`` always-active neurons plus routed experts.

    ``forward`` computes only the experts each token uses; :meth:`forward_reference`
    computes every neuron and masks, which is the training-time definition (kept for tests).

    Fast path.  Expert ``e`` owns neurons ``offsets[e]:offsets[e+1]``: rows of ``gate_proj`` /
    ``up_proj`` and columns of ``down_proj``, always read through views (never gathered).
    Batch-1 decode collects the token's active neuron ranges (shared block and chosen experts,
    adjacent ones merged) and computes them in one call of moefy's compiled CPU kernel
    (:mod:`moefy.kernels`; ``use_kernel = False`` turns it off), else with PyTorch GEMV calls.
    Several tokens are sorted by expert and each used expert runs one matmul over its tokens;
    on CPU in bf16/fp16, an expert with many tokens computes in fp32 (upcast slices).

    ``transpose_down`` picks the memory layout of ``down_proj.weight`` for inference (its shape,
    values and state-dict key never change): ``True`` stores it as the transpose of a
    contiguous ``[intermediate, hidden]`` tensor, so an expert's down-projection is one
    contiguous block (a column-major GEMV) instead of ``hidden`` short strided rows; ``False``
    keeps nn.Linear's layout; ``None`` (default) transposes on CPU, where it measured fastest
    for decode in fp32 and bf16 alike.
    """

    def __init__(
        self,
        hidden_size: int,
        expert_sizes: list[int],
        n_shared: int = 0,
        top_k: float = 2,
        hidden_act: str = "silu",
        bias: bool = False,
        router: str = "topk",
        gating: str = "mask",
        lapsum_alpha: float = 1.0,
        lapsum_threshold: float = 0.0,
        max_active: int | None = None,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.expert_sizes = [int(s) for s in expert_sizes]
        self.n_experts = len(self.expert_sizes)
        self.n_shared = int(n_shared)
        self.top_k = top_k
        self.router_type = router
        self.gating = gating
        self.lapsum_alpha = float(lapsum_alpha)
        self.lapsum_threshold = float(lapsum_threshold)
        self.max_active = max_active
        total = self.n_shared + sum(self.expert_sizes)
        self.intermediate_size = total
        self.gate_proj = nn.Linear(hidden_size, total, bias=bias)
        self.up_proj = nn.Linear(hidden_size, total, bias=bias)
        self.down_proj = nn.Linear(total, hidden_size, bias=bias)
        self.router = nn.Linear(hidden_size, self.n_experts, bias=False)
        self.hidden_act = hidden_act
        self.act_fn = ACT2FN[hidden_act]
        # batch-1 CPU decode through moefy's compiled kernel when it can be had (False: PyTorch GEMVs)
        self.use_kernel = True
        offsets = [self.n_shared]
        for s in self.expert_sizes:
            offsets.append(offsets[-1] + s)
        self.offsets = offsets
        self.transpose_down: bool | None = None
        self._down_layout_key: tuple[Any, ...] | None = None
        # measured routing: set ``count_active = True`` to count (token, expert) pairs run
        self.count_active = False
        self.active_pairs = 0
        self.tokens_seen = 0

    # ----------------------------------------------------------------- routing
    def _topk_route(self, logits: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chosen experts ``[tokens, k]`` and their weights (``None`` for mask gating: all 1)."""
        k = int(self.top_k)
        top = logits.topk(k, dim=-1)
        if self.gating == "mask":
            return top.indices, None
        if self.gating == "softmax":
            vals = torch.softmax(logits.float(), dim=-1).gather(-1, top.indices).to(dtype)
        elif self.gating == "softmax-renorm":
            vals = torch.softmax(top.values.float(), dim=-1).to(dtype)
        else:
            raise ValueError(f"unknown gating {self.gating!r}")
        return top.indices, vals

    def _dense_weights(self, logits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.router_type == "lapsum":
            scores = logits.float()
            t = lapsum_threshold_bisect(scores, float(self.top_k), self.lapsum_alpha)
            w = _laplace_cdf((scores - t) / self.lapsum_alpha)
            keep = (w >= self.lapsum_threshold) | torch.zeros_like(w, dtype=torch.bool).scatter_(
                -1, w.argmax(-1, keepdim=True), True
            )  # a token always keeps its best expert
            if self.max_active is not None and self.max_active < self.n_experts:
                keep = keep & torch.zeros_like(keep).scatter_(-1, w.topk(self.max_active, dim=-1).indices, True)
            w = torch.where(keep, w, torch.zeros_like(w))
            return w.to(dtype)
        idx, vals = self._topk_route(logits, dtype)
        if vals is None:
            vals = torch.ones(idx.shape, dtype=logits.dtype, device=logits.device)
        return torch.zeros_like(logits).scatter(-1, idx, vals)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """Dense ``[tokens, E]`` weights, zero for experts a token does not use."""
        return self._dense_weights(self.router(x), x.dtype)

    # ----------------------------------------------------------------- forward
    def _down_t(self) -> torch.Tensor:
        """``down_proj.weight.t()`` (``[intermediate, hidden]``): expert ``e`` is rows ``lo:hi``.

        Outside training, the weight's memory layout is chosen once per tensor (the choice is
        redone after a cast, a move, a reload or a new ``transpose_down``): see :attr:`transpose_down`.  Any layout
        computes the same values; shape, values and state-dict key never change.
        """
        w = self.down_proj.weight
        if self.training or "_hf_hook" in self.__dict__ or w.dim() != 2 or not w.numel() or w.device.type == "meta":
            return w.t()
        key = (w.data_ptr(), w.dtype, w.device, self.transpose_down)
        if key != self._down_layout_key:
            want = self.transpose_down
            if want is None:  # measured on CPU: contiguous expert blocks decode fastest in every dtype
                want = w.device.type == "cpu" and w.dtype.is_floating_point
            is_t = w.stride(0) == 1 and w.stride(1) == w.shape[0]
            if want != is_t:
                with torch.inference_mode(False), torch.no_grad():
                    w.data = w.data.t().contiguous().t() if want else w.data.contiguous()
            self._down_layout_key = (w.data_ptr(), w.dtype, w.device, self.transpose_down)
        return w.t()

    def _half_cpu(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16)

    def _rows_down(self, h: torch.Tensor, lo: int, hi: int, down_t: torch.Tensor, upcast: bool) -> torch.Tensor:
        """``h @ down_t[lo:hi]`` for several tokens.  On CPU in half precision PyTorch's GEMM is
        very slow for a row-major ``[s, hidden]`` right operand (measured 60x): use fp32
        (``upcast``) or a column-major ``h``, which takes the fast kernel."""
        w = down_t[lo:hi]
        if upcast:
            return torch.mm(h.float(), w.float())
        if self._half_cpu(h) and w.stride(1) == 1:
            if h.shape[0] == 1:  # one token: a column-major GEMV (a [1, s] "column-major" h is still row-major)
                return torch.mv(w.t(), h[0])[None]
            return torch.mm(h.t().contiguous().t(), w)
        return torch.mm(h, w)

    def _rows(self, xe: torch.Tensor, lo: int, hi: int, down_t: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        """Output of neurons ``lo:hi`` for tokens ``xe`` (in fp32 when half precision on CPU)."""
        upcast = self._half_cpu(xe) and xe.shape[0] >= HALF_UPCAST_MIN_TOKENS
        gw, uw = self.gate_proj.weight[lo:hi], self.up_proj.weight[lo:hi]
        gb = self.gate_proj.bias[lo:hi] if self.gate_proj.bias is not None else None
        ub = self.up_proj.bias[lo:hi] if self.up_proj.bias is not None else None
        if upcast:
            xe, gw, uw = xe.float(), gw.float(), uw.float()
            gb, ub = (gb.float() if gb is not None else None), (ub.float() if ub is not None else None)
        h = self.act_fn(F.linear(xe, gw, gb)) * F.linear(xe, uw, ub)
        if w is not None:
            h = h * w.to(h.dtype)
        y = self._rows_down(h, lo, hi, down_t, upcast)
        return y.float() if self._half_cpu(xe) else y

    def _shared_out(self, x: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
        if self.n_shared:
            return self._rows(x, 0, self.n_shared, down_t, None)
        return x.new_zeros(x.shape[0], self.hidden_size, dtype=torch.float32 if self._half_cpu(x) else x.dtype)

    def _kernel_ok(self, x: torch.Tensor, down_t: torch.Tensor) -> bool:
        """Whether batch-1 decode can take moefy's CPU kernel (else PyTorch GEMVs)."""
        if _kernels is None or not self.use_kernel or self.gate_proj.bias is not None:
            return False
        if _kernels.usable(x, self.hidden_act) is None:  # device, dtype, activation, a built kernel
            return False
        gw, uw, rw = self.gate_proj.weight, self.up_proj.weight, self.router.weight
        if not (gw.dtype == uw.dtype == down_t.dtype == x.dtype):
            return False
        if (gw.stride(1) != 1 and gw.shape[1] != 1) or (uw.stride(1) != 1 and uw.shape[1] != 1):
            return False
        if down_t.stride(1) != 1 and down_t.shape[1] != 1:
            return False
        # the kernel records no autograd graph
        return not torch.is_grad_enabled() or not (
            x.requires_grad or gw.requires_grad or uw.requires_grad or down_t.requires_grad or rw.requires_grad
        )

    def _decode(self, x: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
        """One token: the active neuron ranges (shared block, chosen experts), GEMVs over views."""
        kernel = self._kernel_ok(x, down_t)
        r = self.router
        if (
            kernel
            and self.router_type == "topk"
            and not (r._forward_hooks or r._forward_pre_hooks)
            and r.weight.dtype == x.dtype
            and 1 <= int(self.top_k) <= self.n_experts
        ):  # routing inside the kernel too: one call for the whole FFN
            fused = _kernels.moe_decode_topk(
                x[0], r.weight, self.gate_proj.weight, self.up_proj.weight, down_t, self.offsets,
                self.n_shared, int(self.top_k), self.gating, self.hidden_act,
            )
            if fused is not None:
                if self.count_active:
                    self.active_pairs += int(self.top_k)
                    self.tokens_seen += 1
                return fused.to(x.dtype)[None]
        logits = self.router(x)
        if self.router_type == "lapsum":
            w = self._dense_weights(logits, x.dtype)
            chosen = torch.nonzero(w[0]).flatten().tolist()
            vals: torch.Tensor | None = w[0, chosen]
        else:
            idx, vals = self._topk_route(logits, x.dtype)
            chosen = idx[0].tolist()
            vals = vals[0] if vals is not None else None
        if self.count_active:
            self.active_pairs += len(chosen)
            self.tokens_seen += 1
        offsets = self.offsets
        pieces: list[tuple[int, int, torch.Tensor | None]] = [(0, self.n_shared, None)] if self.n_shared else []
        order = sorted(range(len(chosen)), key=chosen.__getitem__) if vals is None else range(len(chosen))
        for j in order:
            e = chosen[j]
            lo, hi = offsets[e], offsets[e + 1]
            if lo == hi:
                continue
            if vals is None and pieces and pieces[-1][1] == lo and pieces[-1][2] is None:
                pieces[-1] = (pieces[-1][0], hi, None)  # adjacent experts: one range
            else:
                pieces.append((lo, hi, vals[j] if vals is not None else None))
        if not pieces:
            return x.new_zeros(1, self.hidden_size)
        if kernel:
            out = _kernels.moe_decode(
                x[0], self.gate_proj.weight, self.up_proj.weight, down_t, [p[0] for p in pieces],
                [p[1] for p in pieces], [1.0 if p[2] is None else float(p[2]) for p in pieces], self.hidden_act,
            )
            if out is not None:
                return out.to(x.dtype)[None]
        # PyTorch fallback: the multi-token path, one neuron range at a time (fp32 sums for half on CPU)
        out = None
        for lo, hi, scale in pieces:
            y = self._rows(x, lo, hi, down_t, scale)
            out = y if out is None else out + y
        return out.to(x.dtype)  # type: ignore[union-attr]

    def _grouped(self, x: torch.Tensor, down_t: torch.Tensor) -> torch.Tensor:
        """Many tokens: sort the (token, expert) pairs by expert (one host sync for the counts),
        then per used expert gather its tokens, run its rows of gate/up and down (views) and
        scatter-add the result.  Gathering per expert keeps each chunk cache-hot (measured
        1.5x faster prefill than gathering all pairs at once with 64 experts)."""
        logits = self.router(x)
        if self.router_type == "lapsum":
            w = self._dense_weights(logits, x.dtype)
            expert, tok = torch.nonzero(w.t(), as_tuple=True)  # sorted by expert, then token
            ws: torch.Tensor | None = w[tok, expert]
        else:
            idx, vals = self._topk_route(logits, x.dtype)
            k = idx.shape[1]
            flat = idx.reshape(-1)
            order = torch.argsort(flat, stable=True)
            expert = flat.index_select(0, order)
            tok = torch.div(order, k, rounding_mode="floor")
            ws = vals.reshape(-1).index_select(0, order) if vals is not None else None
        counts = torch.bincount(expert, minlength=self.n_experts).tolist()
        if self.count_active:
            self.active_pairs += int(expert.numel())
            self.tokens_seen += int(x.shape[0])
        out = self._shared_out(x, down_t)
        offsets = self.offsets
        start = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            lo, hi = offsets[e], offsets[e + 1]
            sl = slice(start, start + c)
            start += c
            if lo == hi:
                continue
            t = tok[sl]
            y = self._rows(x.index_select(0, t), lo, hi, down_t, ws[sl, None] if ws is not None else None)
            out.index_add_(0, t, y)
        return out.to(x.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        down_t = self._down_t()
        if self.n_experts == 0:
            out = self._shared_out(x, down_t).to(x.dtype)
        elif x.shape[0] == 1:
            out = self._decode(x, down_t)
        else:
            out = self._grouped(x, down_t)
        if self.down_proj.bias is not None:
            out = out + self.down_proj.bias
        return out.reshape(shape)

    def neuron_mask(self, weights: torch.Tensor) -> torch.Tensor:
        """Per-neuron multipliers ``[tokens, intermediate]`` from expert weights."""
        sizes = torch.tensor(self.expert_sizes, device=weights.device)
        routed = weights.repeat_interleave(sizes, dim=-1)
        shared = torch.ones(*weights.shape[:-1], self.n_shared, dtype=weights.dtype, device=weights.device)
        return torch.cat([shared, routed], dim=-1)

    def forward_reference(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Every neuron computed, unused experts masked to zero (the training-time path)."""
        h = self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states)
        if self.n_experts == 0:
            return self.down_proj(h)
        return self.down_proj(h * self.neuron_mask(self.routing_weights(hidden_states)))


class MoefyPreTrainedModel(PreTrainedModel):
    config_class = MoefyConfig
    base_model_prefix = "moefy"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        std = float(self.config.base_config.get("initializer_range", 0.02))
        if isinstance(module, nn.Linear):
            with torch.no_grad():
                module.weight.normal_(0.0, std)
                if module.bias is not None:
                    module.bias.zero_()


def build_moe_mlp(config: MoefyConfig, layer_idx: int, hidden_size: int, bias: bool) -> MoefyMLP | None:
    spec = config.moe_layers[layer_idx] if layer_idx < len(config.moe_layers) else None
    if spec is None:
        return None
    alpha = spec.get("lapsum_alpha", config.lapsum_alpha[layer_idx] if config.lapsum_alpha else 1.0)
    return MoefyMLP(
        hidden_size,
        spec["expert_sizes"],
        n_shared=spec.get("n_shared", 0),
        top_k=spec["top_k"],
        hidden_act=config.hidden_act,
        bias=bias,
        router=config.router,
        gating=config.gating,
        lapsum_alpha=alpha,
        lapsum_threshold=spec.get("lapsum_threshold", config.lapsum_threshold),
        max_active=config.max_active,
    )


class MoefyForCausalLM(MoefyPreTrainedModel, GenerationMixin):
    """The base causal LM (held as ``self.model``) with MoE FFNs; forward and generate delegate to it."""

    def __init__(self, config: MoefyConfig, base_model: PreTrainedModel | None = None) -> None:
        """Build from ``config``; or, with ``base_model`` (whose FFNs are already
        :class:`MoefyMLP`), wrap that model in place without allocating a new one."""
        super().__init__(config)
        if base_model is None:
            base_cfg = config.to_base_config()
            # the dtype from_pretrained(dtype=...) is building in (else from_config would use the
            # base config's saved dtype and leave everything but the MoE layers in it)
            dtype = torch.get_default_dtype()
            try:
                base_model = AutoModelForCausalLM.from_config(
                    base_cfg, attn_implementation=config._attn_implementation, dtype=dtype
                )
            except ValueError:  # the base family does not support that attention kernel
                base_model = AutoModelForCausalLM.from_config(base_cfg, attn_implementation="eager", dtype=dtype)
            bias = bool(config.base_config.get("mlp_bias", False))
            for i, layer in enumerate(base_model.model.layers):
                mlp = build_moe_mlp(config, i, base_cfg.hidden_size, bias)
                if mlp is not None:
                    layer.mlp = mlp
        else:
            for module in base_model.modules():  # trained weights: never re-initialise them
                module._is_hf_initialized = True
        self.model = base_model
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        kwargs.setdefault("generation_config", self.generation_config)
        return self.model.generate(*args, **kwargs)
