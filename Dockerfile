# CPU image for the embedded model. (CUDA target and deployment hardening: see the deployment issue.)
FROM python:3.11-slim AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DSPARK_HOST=0.0.0.0 DSPARK_PORT=8000
RUN useradd --create-home --uid 10001 dspark
WORKDIR /app
COPY pyproject.toml README.md run ./
COPY server server
COPY engine engine
COPY scheduler scheduler
COPY kernels kernels
COPY loadtest loadtest
COPY configs configs
COPY models models
RUN DSPARK_VENV=/opt/venv ./run setup && chown -R dspark /app
USER dspark
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health').status!=200)"
CMD ["/opt/venv/bin/dspark", "serve"]
