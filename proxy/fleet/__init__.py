"""Fleet-wide control under ``serve --workers``: the supervisor's control plane, and each
worker's link to it."""
