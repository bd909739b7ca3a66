# A stand-in for the vLLM service in the container check: the project's fake vLLM (tests/fake_upstream.py)
# served by the uvicorn that the TokenTrail image already has. No real vLLM image can be had here.
FROM tokentrail:local
COPY tests/fake_upstream.py /opt/standin/fake_upstream.py
WORKDIR /opt/standin
CMD ["python3", "-m", "uvicorn", "fake_upstream:app", "--host", "0.0.0.0", "--port", "8000", "--log-level", "warning"]
