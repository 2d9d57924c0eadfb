"""DistillKac: few-step image generation with Kac (telegrapher) flows and endpoint distillation."""

__version__ = "0.1.0"
