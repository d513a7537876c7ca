"""robustft: robust fine-tuning of pre-trained vision models, benchmarked under distribution shift."""

__version__ = "0.1.0"
