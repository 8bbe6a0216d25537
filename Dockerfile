# FLClustering services: one image, three entry points (python -m services.<name>).
#   docker build -t flclustering .                        # CUDA torch (GPU participants)
#   docker build --build-arg TORCH_VARIANT=cpu -t flclustering:cpu .   # CPU-only, smaller
# Add --build-arg REVISION=$(git rev-parse --short HEAD): --version, the status RPCs and
# flclustering_build_info then name the source revision too.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cuda
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/flclustering
ENV PATH=/opt/flclustering/bin:$PATH
# torch first: the biggest layer, and it changes least often.
RUN if [ "$TORCH_VARIANT" = "cpu" ]; then \
        pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
            "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    else \
        pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"; \
    fi
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install --no-cache-dir . \
    && find /opt/flclustering -name '__pycache__' -type d -prune -exec rm -rf {} +

FROM ${PYTHON_IMAGE}
ARG REVISION=""
LABEL org.opencontainers.image.title="flclustering" \
      org.opencontainers.image.description="Fair and robust clustered federated learning: participant, clusterer and aggregator services" \
      org.opencontainers.image.revision="${REVISION}"
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin flclustering
COPY --from=build /opt/flclustering /opt/flclustering
ENV PATH=/opt/flclustering/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    FLCLUSTERING_REVISION=${REVISION}
WORKDIR /tmp
USER 10001:10001
EXPOSE 50051 50052 9101 9102 9103
# The manifests run `python -m services.<name>`; so does the README.
ENTRYPOINT ["python", "-m"]
CMD ["services.clusterer"]
