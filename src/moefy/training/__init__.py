"""Recovery training (DOT-MoE's alignment stage): data streaming, the distillation loss, the
student built from a moefy checkpoint, the training loop and the ``moefy train`` job."""

from .config import TrainConfig
from .data import PackedData, write_token_shards

__all__ = ["PackedData", "TrainConfig", "write_token_shards"]
