# TokenTrail proxy image. Multi-stage: the final image has Python and the installed app, no compilers,
# no pip caches. Configure it only through TOKENTRAIL_* variables; the database lives on /data.
#
#   docker build -t tokentrail .                                   # from debian:bookworm-slim
#   docker build --build-arg BASE_IMAGE=my/debian:12 -t tokentrail .
#   docker build --build-arg EXTRAS=proxy,postgres,export -t tokentrail .   # with Parquet export
ARG BASE_IMAGE=debian:bookworm-slim
# Extras to install: add ",export" for Parquet export inside the container (pyarrow, about 130 MB more).
ARG EXTRAS=proxy,postgres

FROM ${BASE_IMAGE} AS build
ARG EXTRAS
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/tokentrail
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY migrations ./migrations
COPY client ./client
RUN /opt/tokentrail/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/tokentrail/bin/pip install --no-cache-dir ".[${EXTRAS}]" \
 && find /opt/tokentrail -name '__pycache__' -prune -exec rm -rf {} + \
 && /opt/tokentrail/bin/python -m compileall -q /opt/tokentrail/lib

FROM ${BASE_IMAGE}
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin tokentrail \
 && mkdir -p /data && chown tokentrail /data
COPY --from=build /opt/tokentrail /opt/tokentrail
ENV PATH=/opt/tokentrail/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TOKENTRAIL_HOST=0.0.0.0 \
    TOKENTRAIL_PORT=8000 \
    TOKENTRAIL_DB=sqlite:////data/tokentrail.db \
    TOKENTRAIL_FALLBACK_PATH=/data/tokentrail-fallback.jsonl \
    TOKENTRAIL_UPSTREAM=http://vllm:8000
USER tokentrail
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=5 \
  CMD ["python3", "-c", "import os, sys, urllib.request; port = os.environ.get('TOKENTRAIL_PORT', '8000'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/tokentrail/health', timeout=2).status == 200 else 1)"]
STOPSIGNAL SIGTERM
CMD ["tokentrail", "serve"]
