"""thresher: serve activation-sparse, SAE-steerable LLMs on vLLM."""

__version__ = "0.1.0"
