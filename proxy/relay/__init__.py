"""The ASGI relay: one call from the client to vLLM and back, its headers, and where its trajectory id
comes from.
"""
