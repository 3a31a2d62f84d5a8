# cycles-proxy: a small image that runs as non-root and takes its settings from the environment.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cycles_proxy ./cycles_proxy
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --home-dir /data --create-home cycles
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/* && rm -rf /wheels
USER cycles
WORKDIR /data
# listen on all interfaces inside the container; the ledger lives in the /data volume
ENV CYCLES_PROXY_HOST=0.0.0.0 \
    CYCLES_PROXY_ADMIN_HOST=0.0.0.0 \
    CYCLES_PROXY_DB=/data/ledger.db \
    CYCLES_PROXY_UPSTREAM=http://ollama:11434
VOLUME ["/data"]
EXPOSE 11434 11439
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:11439/healthz', timeout=2); sys.exit(0)"
ENTRYPOINT ["cycles-proxy"]
CMD ["serve"]
