"""moefy: turn a dense decoder LLM into a sparse Mixture-of-Experts (DOT-MoE)."""

__version__ = "0.1.0"
