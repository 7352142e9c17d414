# balsync's image, for deploy/kubernetes/cronjob.yaml: `make image` builds it (docker or
# podman). Non-root (uid 10001, as the manifest's runAsUser), nothing written at run time
# outside /tmp, so readOnlyRootFilesystem holds; `balsync` is the entrypoint.
ARG PYTHON_VERSION=3.12

FROM python:${PYTHON_VERSION}-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/balsync/.venv
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY balance_sync/ balance_sync/
# A regular (not editable) install: the image keeps no source tree. pip compiles the
# bytecode now, since a read-only root filesystem lets Python write none later.
RUN /opt/balsync/.venv/bin/pip install .

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --system --gid 10001 balsync \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin balsync
# The same path as in the build stage: the venv's scripts name their interpreter by it.
COPY --from=build /opt/balsync/.venv /opt/balsync/.venv
# TMPDIR is the manifest's emptyDir; the secrets are mounted as files at run time, never
# baked in (BALSYNC_DATABASE_URL_FILE, BALSYNC_REDIS_URL_FILE).
ENV PATH=/opt/balsync/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
# Numeric, so that Kubernetes' runAsNonRoot can check it without the image's /etc/passwd.
USER 10001:10001
ENTRYPOINT ["balsync"]
CMD ["--help"]
