"""moefy: turn a dense decoder LLM into a sparse Mixture-of-Experts (DOT-MoE).

Importing moefy registers the ``moefy`` model type with transformers' Auto classes, so
``AutoModelForCausalLM.from_pretrained(converted_dir)`` works without ``trust_remote_code``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .hf.configuration_moefy import MoefyConfig
from .hf.modeling_moefy import MoefyForCausalLM, MoefyMLP

__version__ = "0.1.0"

try:
    AutoConfig.register("moefy", MoefyConfig)
    AutoModelForCausalLM.register(MoefyConfig, MoefyForCausalLM)
except ValueError:  # already registered (module reloaded)
    pass

__all__ = ["MoefyConfig", "MoefyForCausalLM", "MoefyMLP", "__version__"]
