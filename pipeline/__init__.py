"""Distill: distil a frontier-model workload into a small fine-tuned student."""

__version__ = "0.1.0"
