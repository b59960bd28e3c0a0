"""Configuration of a moefy Mixture-of-Experts checkpoint (self-contained: torch + transformers only)."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig


class MoefyConfig(PretrainedConfig):
    """A dense base model's config plus the MoE layout that replaced its FFNs.

    ``moe_layers`` has one entry per decoder layer: ``None`` keeps the dense FFN, otherwise a
    dict with ``expert_sizes`` (neurons per routed expert, contiguous after ``n_shared``
    always-active neurons), ``n_shared`` and ``top_k`` (a float mean for variable-k routers).
    ``router`` is ``"topk"`` (hard top-k) or ``"lapsum"`` (truncated LapSum soft top-k);
    ``gating`` says how chosen experts are weighted: ``"mask"`` (weight 1, DOT-MoE),
    ``"softmax"`` (router probability), ``"softmax-renorm"`` (probabilities renormalised
    over the chosen experts, as Mixtral) or ``"lapsum"``.
    """

    model_type = "moefy"
    has_no_defaults_at_init = True

    def __init__(
        self,
        base_config: dict[str, Any] | None = None,
        moe_layers: list[dict[str, Any] | None] | None = None,
        hidden_act: str = "silu",
        router: str = "topk",
        gating: str = "mask",
        lapsum_alpha: list[float] | None = None,
        lapsum_threshold: float = 0.0,
        max_active: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.base_config = dict(base_config or {})
        self.moe_layers = list(moe_layers or [])
        self.hidden_act = hidden_act
        self.router = router
        self.gating = gating
        self.lapsum_alpha = lapsum_alpha
        self.lapsum_threshold = lapsum_threshold
        self.max_active = max_active
        base = self.base_config
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "tie_word_embeddings",
                    "bos_token_id", "eos_token_id", "pad_token_id"):
            if key in base and key not in kwargs:
                kwargs[key] = base[key]
        super().__init__(**kwargs)

    def to_base_config(self) -> PretrainedConfig:
        cfg = dict(self.base_config)
        model_type = cfg.pop("model_type")
        for key in ("_attn_implementation", "_attn_implementation_internal", "attn_implementation"):
            cfg.pop(key, None)
        return AutoConfig.for_model(model_type, **cfg)
