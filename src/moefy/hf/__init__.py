"""Self-contained Hugging Face classes for moefy checkpoints.

These two files are copied verbatim into every exported checkpoint so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` works without moefy
installed; they import only torch and transformers.
"""
