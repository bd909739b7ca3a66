"""TokenTrail's Strands client: a drop-in replacement for ``strands_vllm`` that tags trajectories.

Change ``from strands_vllm import ...`` to ``from tokentrail.client import ...``. It never imports
the proxy, FastAPI or SQLModel.
"""

from __future__ import annotations

from tokentrail.client.hooks import VLLMToolValidationHooks
from tokentrail.client.model import VLLMModel, VLLMModelConfig, make_vllm_openai_model
from tokentrail.client.recorder import VLLMTokenRecorder
from tokentrail.client.tokens import Token, TokenManager
from tokentrail.client.trajectory import (
    TRAJECTORY_HEADER,
    Trajectory,
    current_trajectory_id,
    new_trajectory_id,
    trajectory,
)

__all__ = [
    "TRAJECTORY_HEADER",
    "Token",
    "TokenManager",
    "Trajectory",
    "VLLMModel",
    "VLLMModelConfig",
    "VLLMTokenRecorder",
    "VLLMToolValidationHooks",
    "current_trajectory_id",
    "make_vllm_openai_model",
    "new_trajectory_id",
    "trajectory",
]
