# A small pullproxy image: non-root, cache on a volume, config at /etc/pullproxy/config.toml.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY cache ./cache
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
RUN useradd --system --uid 10001 --home-dir /var/lib/pullproxy pullproxy \
    && mkdir -p /var/lib/pullproxy /etc/pullproxy \
    && chown pullproxy /var/lib/pullproxy
USER pullproxy
ENV PULLPROXY_CACHE_DIR=/var/lib/pullproxy
VOLUME /var/lib/pullproxy
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/healthz', timeout=2)"
ENTRYPOINT ["pullproxy", "serve"]
# Mount a config file here and pass it: docker run -v ./config.toml:/etc/pullproxy/config.toml ... --config /etc/pullproxy/config.toml
CMD []
