"""How TokenTrail talks to vLLM: the keep-alive HTTP/1.1 client (connections) and the balancer that picks
an upstream.
"""
