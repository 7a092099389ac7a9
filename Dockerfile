# ssa-server's image: the wheel built in a build stage, installed with the [postgres] and [otel]
# extras into python:3.11-slim; no compiler, no pip cache, no source tree in the final image.
# Build: docker build -t ssa-server .   Run and compose: README "Container".

# --- build: the wheels of ssa-server and of every dependency (binary wheels where PyPI has them) ---
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY core/ core/
COPY plugins/ plugins/
# requirements.txt names the exact wheel just built (its file), with the extras.
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres,otel]" \
 && printf 'ssa-server[postgres,otel] @ file://%s\n' /wheels/ssa_server-*.whl > /wheels/requirements.txt

# --- final: the wheels installed from the build stage only (no index), a non-root user ---
FROM python:3.11-slim
# A fixed uid/gid (10001): volumes and secrets can be given to it by number on the host.
RUN groupadd --system --gid 10001 ssa \
 && useradd --system --uid 10001 --gid ssa --home-dir /data --no-create-home --shell /usr/sbin/nologin ssa \
 && mkdir -p /data /scripts \
 && chown ssa:ssa /data \
 && chmod 0700 /data
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels --requirement /wheels/requirements.txt

# The embedded store and the keys (TinyDB journal, 0600 files) live in /data; the scripts folder
# is /scripts (mount yours read-only).  One process on the embedded store; serve --workers N and
# several nodes need SSA_STORE_URL=postgresql://... (compose.yaml).
ENV SSA_DATA_DIR=/data \
    SSA_SCRIPTS_DIR=/scripts \
    SSA_PORT=8080 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
VOLUME /data
USER 10001:10001
WORKDIR /data
EXPOSE 8080
# Ready = the store answers a read and a write, and a signing key is active (GET /health/ready);
# slim has no curl: the standard library asks.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; port = os.environ.get('SSA_PORT', '8080'); sys.exit(0 if urllib.request.urlopen(f'http://127.0.0.1:{port}/health/ready', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["ssa-server"]
# Set SSA_ISSUER to the URL clients reach the server at (the default would name 0.0.0.0).
CMD ["serve", "--host", "0.0.0.0"]
