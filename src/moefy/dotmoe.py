"""The DOT-MoE layer: a dense gated FFN simulated as an MoE with a learnable assignment.

In the dense neuron order, with ``H = act(x Wg^T) * (x Wu^T)`` (tokens x d_ffn)::

    M_soft = Sinkhorn(A / tau)                      # neurons x experts, rows 1, columns c_e
    M      = round(M_soft);  M_ste = M + M_soft - M_soft.detach()
    R      = topk(router(x)); R_ste = R + P - P.detach()
    Y_hat  = (H * (R_ste @ M_ste^T)) @ Wd^T         # shared neurons always 1

Forward values are those of the hard MoE (the exported model computes exactly this): which
experts a token runs and their weights come from the routing functions of
:mod:`moefy.hf.modeling_moefy`, the exported model's own; this layer adds only gradients
(straight-through estimators, the LapSum backward).  Gradients reach ``A`` through ``M_soft``
and the router through ``P``.  With the assignment
frozen (``learn_assignment=False``) the same layer trains only a router over a fixed split,
which is how every baseline split is given the same router training.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .adapters import FFNWeights
from .hf.modeling_moefy import MoefyMLP, gating_weights, lapsum_route, scatter_weights, topk_experts
from .lapsum import calibrate_threshold as calibrate_lapsum_threshold
from .ot import assignment_matrix, round_exact, round_greedy, sinkhorn_log, straight_through
from .routing import load_balance_loss, route_ste, z_loss
from .splits import Split


class DotMoeLayer(nn.Module):
    def __init__(
        self,
        ffn: FFNWeights,
        act_fn: Callable[[torch.Tensor], torch.Tensor],
        hidden_act: str,
        split: Split,
        top_k: int,
        learn_assignment: bool = True,
        init_margin: float = 3.0,
        rounding: str = "greedy",
        sinkhorn_iters: int = 30,
        router_type: str = "topk",
        max_active: int | None = None,
        gating: str = "mask",
    ) -> None:
        super().__init__()
        n_exp = split.n_experts
        self.n_experts = n_exp
        self.top_k = top_k
        self.act_fn = act_fn
        self.hidden_act = hidden_act
        self.rounding = rounding
        self.sinkhorn_iters = sinkhorn_iters
        self.learn_assignment = learn_assignment
        self.tau = 1.0
        self.dense_mode = False
        # fitting runs in fp32 whatever the model's dtype: one fp32 copy of each weight
        def f32(t: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(t.detach().to(dtype=torch.float32, copy=True), requires_grad=False)

        self.gate, self.up, self.down = f32(ffn.gate), f32(ffn.up), f32(ffn.down)
        self.gate_bias = self.up_bias = self.down_bias = None
        if ffn.has_bias:
            self.gate_bias, self.up_bias, self.down_bias = f32(ffn.gate_bias), f32(ffn.up_bias), f32(ffn.down_bias)
        dev = self.gate.device  # everything lives where the FFN weights are; the split may be elsewhere
        if n_exp == 0:  # structured pruning: the non-shared neurons are dropped, not routed
            keep = torch.ones(ffn.d_ffn, dtype=torch.bool, device=split.shared.device)
            keep[split.shared] = False
            routed_sorted = torch.nonzero(keep).flatten()
            init_assign = torch.zeros(routed_sorted.numel(), dtype=torch.long, device=routed_sorted.device)
        else:
            routed = split.permutation()[split.shared.numel() :]
            order = torch.argsort(routed)
            routed_sorted = routed[order]
            sizes = split.expert_sizes
            init_assign = torch.cat([torch.full((s,), e, dtype=torch.long, device=routed.device) for e, s in enumerate(sizes)])[order]
        routed_sorted, init_assign = routed_sorted.to(dev), init_assign.to(dev)
        self.register_buffer("shared_idx", split.shared.clone().to(dev), persistent=True)
        self.register_buffer("routed_idx", routed_sorted, persistent=True)
        self.register_buffer("fixed_assign", init_assign, persistent=True)
        self.caps = [int((init_assign == e).sum()) for e in range(n_exp)]
        learn_assignment = learn_assignment and n_exp > 1
        self.learn_assignment = learn_assignment
        init_affinity = assignment_matrix(init_assign, n_exp) if n_exp else torch.zeros(init_assign.numel(), 0, device=dev)
        self.affinity = nn.Parameter(init_margin * init_affinity, requires_grad=learn_assignment)
        self.router = nn.Linear(ffn.d_model, n_exp, bias=False, device=dev)
        nn.init.zeros_(self.router.weight)
        # LapSum soft top-k (SoftMoE): expert weights F((r - t)/alpha) summing to k (a real
        # budget, possibly learned per layer), truncated below ``threshold``.
        self.router_type = router_type
        self.gating = gating  # top-k: "mask" (weight 1, DOT-MoE), "softmax" or "softmax-renorm" (Mixtral's)
        self.k_budget: float | torch.Tensor = float(top_k)
        self.max_active = max_active
        self.log_alpha = nn.Parameter(torch.zeros((), device=dev), requires_grad=router_type == "lapsum")
        self.register_buffer("threshold", torch.zeros((), device=dev), persistent=True)
        self.aux: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------ assignment
    @property
    def d_ffn(self) -> int:
        return int(self.gate.shape[0])

    def soft_assignment(self) -> torch.Tensor:
        return sinkhorn_log(self.affinity, self.caps, tau=self.tau, n_iter=self.sinkhorn_iters).exp()

    def hard_assignment(self, soft: torch.Tensor | None = None) -> torch.Tensor:
        """Expert of every routed neuron (indices into ``routed_idx``)."""
        if not self.learn_assignment:
            return self.fixed_assign
        soft = self.soft_assignment() if soft is None else soft
        rounder = round_exact if self.rounding == "exact" else round_greedy
        return rounder(soft, self.caps).to(self.affinity.device)

    def assignment_ste(self) -> torch.Tensor:
        if not self.learn_assignment:
            return assignment_matrix(self.fixed_assign, self.n_experts)
        soft = self.soft_assignment()
        hard = assignment_matrix(self.hard_assignment(soft), self.n_experts)
        return straight_through(hard, soft) if torch.is_grad_enabled() else hard

    def freeze_assignment(self) -> None:
        """Fix the current hard assignment; the layer then trains only router (and weights)."""
        with torch.no_grad():
            self.fixed_assign.copy_(self.hard_assignment())
        self.learn_assignment = False
        self.affinity.requires_grad_(False)

    def split(self) -> Split:
        if self.n_experts == 0:
            return Split(self.shared_idx.cpu(), [])
        return Split.from_assignment(self.shared_idx.cpu(), self.routed_idx.cpu(), self.hard_assignment().cpu(), self.n_experts)

    # --------------------------------------------------------------- forward
    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        g = nn.functional.linear(x, self.gate, self.gate_bias)
        return self.act_fn(g) * nn.functional.linear(x, self.up, self.up_bias)

    def _per_neuron(self, weights: torch.Tensor) -> torch.Tensor:
        """Expert weights ``[..., E]`` -> each routed neuron's ``[..., n_routed]``: exact, the forward
        assignment is one-hot."""
        m = self.assignment_ste()
        return weights.to(m.dtype) @ m.T

    def neuron_mask(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_experts == 0:
            full = torch.ones(*x.shape[:-1], self.d_ffn, dtype=x.dtype, device=x.device)
            return full.index_fill(-1, self.routed_idx, 0.0)
        logits = self.router(x)
        if self.router_type == "lapsum":
            weights, active = self.lapsum_weights(logits, float(self.threshold))
            self.aux = {"logits": logits, "probs": torch.softmax(logits.float(), -1), "hard": active.float()}
            routed = self._per_neuron(weights)
        else:
            r_ste, hard, probs = route_ste(logits, self.top_k)
            self.aux = {"logits": logits, "probs": probs, "hard": hard}
            if self.gating != "mask":  # the exported weights, with their exact gradients
                idx = topk_experts(logits.detach(), self.top_k)
                r_ste = scatter_weights(logits, idx, gating_weights(logits, idx, self.gating, logits.dtype))
            routed = self._per_neuron(r_ste)
        full = torch.ones(*x.shape[:-1], self.d_ffn, dtype=x.dtype, device=x.device)
        return full.index_copy(-1, self.routed_idx, routed.to(x.dtype))

    def forward(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(x) if h is None else h
        if not self.dense_mode:
            h = h * self.neuron_mask(x)
        return nn.functional.linear(h, self.down, self.down_bias)

    def lapsum_alpha(self) -> torch.Tensor:
        """The LapSum temperature ``exp(log_alpha)`` (fp32), as exported."""
        return self.log_alpha.float().exp()

    def lapsum_weights(self, logits: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncated LapSum weights (with the solve's exact gradient) and the kept mask: the
        exported rule, :func:`moefy.hf.modeling_moefy.lapsum_route`."""
        return lapsum_route(logits, self.k_budget, self.lapsum_alpha(), threshold, self.max_active)

    @torch.no_grad()
    def calibrate_threshold(self, x: torch.Tensor, target_active: float | None = None, iters: int = 40) -> float:
        """LapSum: set the truncation threshold (:func:`moefy.lapsum.calibrate_threshold`) so the mean
        number of experts run per token on ``x`` matches ``target_active`` (default: the budget k);
        returns the mean achieved."""
        if self.router_type != "lapsum":
            return float(self.top_k)
        target = float(self.k_budget) if target_active is None else target_active
        logits = self.router(x)
        best = calibrate_lapsum_threshold(logits, self.k_budget, self.lapsum_alpha(), target, self.max_active, iters)
        self.threshold.fill_(best)
        return float(self.lapsum_weights(logits, best)[1].float().sum(-1).mean())

    def aux_losses(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(z-loss, load-balance loss) of the last forward."""
        if self.n_experts == 0:
            zero = self.down.new_zeros(())
            return zero, zero
        return z_loss(self.aux["logits"]), load_balance_loss(self.aux["probs"], self.aux["hard"])

    # ---------------------------------------------------------------- export
    def to_moe_mlp(self, dtype: torch.dtype | None = None) -> MoefyMLP:
        """The inference module: neurons permuted so each expert is contiguous, on this layer's
        device, in ``dtype`` (default: this layer's, fp32)."""
        split = self.split()
        device = self.gate.device
        perm = split.permutation().to(device)
        with torch.device("meta"):  # no default-dtype CPU copy: allocated once, below, where it belongs
            mlp = MoefyMLP(
                self.gate.shape[1],
                split.expert_sizes,
                n_shared=split.shared.numel(),
                top_k=(float(self.k_budget) if self.router_type == "lapsum" else self.top_k) if self.n_experts else 0,
                hidden_act=self.hidden_act,
                bias=self.gate_bias is not None,
                router=self.router_type,
                gating="lapsum" if self.router_type == "lapsum" else self.gating,
                lapsum_alpha=float(self.lapsum_alpha()),
                lapsum_threshold=float(self.threshold),
                max_active=self.max_active,
            )
        mlp = mlp.to(dtype or self.gate.dtype).to_empty(device=device)
        with torch.no_grad():
            mlp.gate_proj.weight.copy_(self.gate[perm])
            mlp.up_proj.weight.copy_(self.up[perm])
            mlp.down_proj.weight.copy_(self.down[:, perm])
            if self.gate_bias is not None:
                mlp.gate_proj.bias.copy_(self.gate_bias[perm])
                mlp.up_proj.bias.copy_(self.up_bias[perm])
                mlp.down_proj.bias.copy_(self.down_bias)
            mlp.router.weight.copy_(self.router.weight)
        mlp.source_neurons = perm.tolist()  # provenance for moefy.json (not a weight)
        return mlp.eval() if not self.training else mlp
