"""What is kept of a call: the record, the capture of vLLM's answer, the writer thread, the spool and the
OTel span.
"""
