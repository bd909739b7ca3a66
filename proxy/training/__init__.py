"""Recorded trajectories as training data: sequences with loss masks, and ``tokentrail export``."""
