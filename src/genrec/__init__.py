"""genrec: LLM-based generative recommendation."""

__version__ = "0.1.0"
