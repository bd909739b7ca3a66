"""TokenTrail's own HTTP routes, all under ``/tokentrail/`` so they never clash with vLLM's paths."""
