# A small pullproxy image: non-root, cache on a volume, config at /etc/pullproxy/config.toml.
#   docker run -p 5000:5000 -v pullproxy-cache:/var/lib/pullproxy -v ./pullproxy.toml:/etc/pullproxy/config.toml:ro pullproxy
# Where Docker Hub is out of reach, name the base through a mirror:
#   --build-arg PYTHON_IMAGE=mirror.internal:5000/library/python:3.11-slim
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY cache ./cache
RUN python3 -m venv /opt/pullproxy && /opt/pullproxy/bin/pip install --no-cache-dir .

FROM ${PYTHON_IMAGE}
COPY --from=build /opt/pullproxy /opt/pullproxy
# The example config (Docker Hub as the default upstream) until one is mounted over it.
COPY config.example.toml /etc/pullproxy/config.toml
RUN useradd --system --uid 10001 --home-dir /var/lib/pullproxy pullproxy \
    && mkdir -p /var/lib/pullproxy \
    && chown pullproxy /var/lib/pullproxy
USER pullproxy
# Every command (serve, prefetch, cache ls, ...) reads this config unless given --config.
ENV PATH=/opt/pullproxy/bin:$PATH \
    PULLPROXY_CONFIG=/etc/pullproxy/config.toml \
    PULLPROXY_CACHE_DIR=/var/lib/pullproxy \
    PYTHONUNBUFFERED=1
VOLUME /var/lib/pullproxy
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=2)"
ENTRYPOINT ["pullproxy", "serve"]
