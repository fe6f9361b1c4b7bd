# The ECS task image: the processor and its runtime dependencies only. Multi-arch (linux/amd64, linux/arm64):
#   docker buildx build --platform linux/amd64,linux/arm64 -t <repo>:<tag> --push .
# Pinned base (Python 3.11 on Debian bookworm, slim). Update the digest deliberately, never implicitly.
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY processor ./processor
COPY orchestration ./orchestration
COPY loadgen ./loadgen
COPY perf ./perf
COPY shopkpi ./shopkpi
RUN python -m pip wheel --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 SHOPKPI_WORK_DIR=/scratch
RUN useradd --create-home --uid 10001 shopkpi && mkdir /scratch && chown shopkpi /scratch
COPY --from=build /wheels /wheels
RUN python -m pip install --no-index --find-links /wheels shopkpi && rm -rf /wheels
USER shopkpi
WORKDIR /scratch
# The task definitions pass the step as the command: validate SOURCE | transform FILE_ID | quarantine FILE_ID | merge
ENTRYPOINT ["shopkpi-task"]
CMD ["--help"]
