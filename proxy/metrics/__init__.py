"""Prometheus metrics at ``/tokentrail/metrics``: what was relayed and recorded, and how the writer,
the spool and the upstreams are doing.

``catalog`` names every metric once; ``calls`` counts finished calls from their records (on the
writer thread, never on the request path); ``snapshot`` gathers one process's figures as plain,
JSON-able values that add up across ``serve --workers``; ``exposition`` turns the sum into the
Prometheus text format with ``prometheus_client``.
"""
