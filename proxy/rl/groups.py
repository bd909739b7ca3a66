"""GRPO groups: several trajectories sampled for one task, compared by reward within the group."""

from __future__ import annotations

import math


def group_advantages(rewards: list[float | None]) -> list[float | None]:
    """(reward - mean) / std over the rewarded trajectories of a group, std taken over the population.

    None where it is undefined: a trajectory without a reward, or a group whose rewards are all equal
    (std 0, which includes a group with a single reward): dividing by zero would give no signal, and
    a made-up 0 would look like one.
    """
    known = [r for r in rewards if r is not None]
    if not known:
        return [None] * len(rewards)
    mean = sum(known) / len(known)
    std = math.sqrt(sum((r - mean) ** 2 for r in known) / len(known))
    if std == 0:
        return [None] * len(rewards)
    return [None if r is None else (r - mean) / std for r in rewards]
