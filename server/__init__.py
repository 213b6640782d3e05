"""neuronserve: an LLM inference server with per-request sparsity and neuron interventions."""

__version__ = "0.1.0"
