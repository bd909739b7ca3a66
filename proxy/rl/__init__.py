"""The reinforcement-learning loop around vLLM: policy versions per call, pause and resume of the
whole fleet through TokenTrail, and GRPO groups."""
