"""How TokenTrail serves HTTP: uvicorn's protocol with head limits, the hot-path hooks it hands the relay,
and ``--workers`` processes.
"""
