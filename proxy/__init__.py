"""TokenTrail's recording proxy: forwards OpenAI-compatible calls to vLLM and records exact token IDs."""

from __future__ import annotations

__version__ = "0.1.0"
