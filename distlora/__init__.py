"""distlora: LoRA fine-tuning of causal LMs on Accelerate, 1 GPU to many nodes."""

__version__ = "0.1.0"
