# syntax=docker/dockerfile:1
# cycles-proxy: a small image that runs as non-root and takes its settings from the environment.
#   docker build -t cycles-proxy .
#   docker run -p 11434:11434 -p 127.0.0.1:11439:11439 -v cycles-data:/data \
#     -e CYCLES_PROXY_UPSTREAM=http://ollama-host:11434 cycles-proxy
# Manage keys and budgets in the same volume: docker exec CONTAINER cycles-proxy keys create acme
# A compose example with Ollama behind the proxy: deploy/compose.yaml.

FROM python:3.11-slim AS build
WORKDIR /src
# README.md* : the glob keeps the build working in a checkout without a README
COPY pyproject.toml README.md* ./
COPY cycles_proxy ./cycles_proxy
# wheels of the project and of all its dependencies, for the runtime stage to install offline
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="cycles-proxy" \
      org.opencontainers.image.description="Budget-guarded reverse proxy for Ollama and OpenAI-compatible servers" \
      org.opencontainers.image.licenses="Apache-2.0"
# the wheels are bind-mounted from the build stage, so they never become a layer of this image
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-compile /wheels/*.whl \
 && groupadd --system --gid 10001 cycles \
 && useradd --system --uid 10001 --gid 10001 --home-dir /data --create-home --shell /usr/sbin/nologin cycles
# numeric, so that orchestrators can verify runAsNonRoot
USER 10001:10001
WORKDIR /data
# Every setting is an environment variable (CYCLES_PROXY_<NAME>, CYCLES_BASE_URL, CYCLES_API_KEY)
# or a TOML file given by CYCLES_PROXY_CONFIG. Inside the container both listeners take all
# interfaces; publish the admin port only on a private address (it has no authentication).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CYCLES_PROXY_HOST=0.0.0.0 \
    CYCLES_PROXY_PORT=11434 \
    CYCLES_PROXY_ADMIN_HOST=0.0.0.0 \
    CYCLES_PROXY_ADMIN_PORT=11439 \
    CYCLES_PROXY_DB=/data/ledger.db \
    CYCLES_PROXY_UPSTREAM=http://ollama:11434
# the ledger, the API keys and the settlement journal live here
VOLUME ["/data"]
EXPOSE 11434 11439
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CYCLES_PROXY_ADMIN_PORT', '11439'), timeout=2)"]
ENTRYPOINT ["cycles-proxy"]
CMD ["serve"]
