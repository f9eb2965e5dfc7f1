# mlflow-gateway-backfill as a container: `make image` builds it (scripts/build-image.sh puts the wheels in
# build/image/ first: nothing is downloaded inside the build).
#
#   docker run --rm -e MLFLOW_BACKEND_STORE_URI=postgresql://mlflow:pw@db/mlflow mlflow-gateway-backfill run
#   docker run --rm -e MLFLOW_BACKEND_STORE_URI=... --entrypoint alembic mlflow-gateway-backfill upgrade head
#
# BASE_IMAGE: any Debian-based image with python3 at the Python version the wheels were fetched for. The
# default is the official slim image, for hosts that can pull it; `make image` passes a Debian bookworm base
# built locally instead.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
COPY build/image/ /build/
# uv comes as a wheel among the others; it installs the locked, hash-checked wheels into /opt/venv offline.
RUN set -eu; \
    python3 -m zipfile -e /build/wheels/uv-*.whl /tmp/uv; \
    uv=$(echo /tmp/uv/uv-*.data/scripts/uv); chmod +x "$uv"; \
    export UV_NO_CACHE=1 UV_PYTHON_DOWNLOADS=never; \
    "$uv" venv --quiet --python "$(command -v python3)" /opt/venv; \
    "$uv" pip install --quiet --python /opt/venv/bin/python --no-index --find-links /build/wheels \
        --require-hashes --compile-bytecode -r /build/requirements.txt; \
    "$uv" pip install --quiet --python /opt/venv/bin/python --no-index --no-deps --compile-bytecode \
        /build/wheels/mlflow_gateway_backfill-*.whl

FROM ${BASE_IMAGE}
# A numeric, non-root user, so that Kubernetes' runAsNonRoot can verify it; a passwd entry, because libpq
# looks the user up (home directory, ~/.pgpass).
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin backfill
COPY --from=build /opt/venv /opt/venv
# alembic.ini and the revisions, so that `alembic upgrade head` works from the working directory.
COPY alembic.ini /app/
COPY migrations/ /app/migrations/
WORKDIR /app
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    LANG=C.UTF-8
USER 10001:10001
ENTRYPOINT ["mlflow-gateway-backfill"]
CMD ["--help"]
