# FLClustering: one Dockerfile, two images, one per target (docs/deployment.md, "Images"):
#   control-plane  the aggregator and the clusterer: python -m services.aggregator | clusterer
#   participant    participants: python -m services.participant. The control plane's layers
#                  plus one: the libraries only participants import (Arrow/Parquet, plotting)
#   docker build --target control-plane -t flclustering-control-plane:0.2.0 .
#   docker build --target participant -t flclustering-participant:0.2.0 .
# Add --build-arg VERSION=0.2.0 --build-arg REVISION="$(git rev-parse HEAD)" and
# --build-arg SOURCE=<the repository's URL> for the labels.
# Every dependency comes from the lock, requirements/runtime.txt (exported from uv.lock: each
# package pinned, with its hashes), installed with --require-hashes --no-deps: pip resolves
# nothing and installs no file whose hash the lock does not list.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# cuda: torch and torchvision as locked (PyPI's x86_64 build for CUDA, with its nvidia-*,
# cuda-* and triton wheels, about 3 GB). cpu: torch and torchvision from PyTorch's CPU index
# instead; NOT LOCKED (the lock holds no hashes for those wheels, which are not on PyPI):
# pinned to the lock's versions, fetched over HTTPS and trusted as such. The rest is locked.
ARG TORCH_VARIANT=cuda
# The distributions only participants import: the control plane leaves them out
# (tests/deploy/test_images.py checks that the aggregator and the clusterer never import them
# and that nothing else in the lock needs them).
ARG PARTICIPANT_ONLY="pyarrow matplotlib contourpy cycler fonttools kiwisolver pyparsing python-dateutil"
ARG VERSION=dev
ARG REVISION=""
ARG SOURCE=unknown

# ---- build stages: virtual environments from the lock, byte-compiled, and their SBOMs ------
FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_NO_INPUT=1
WORKDIR /src
# The SBOM generator (CycloneDX's), pinned, in a venv of its own that no image ships.
ARG CYCLONEDX_BOM_VERSION=7.5.0
RUN python -m venv /opt/sbom-tool \
    && /opt/sbom-tool/bin/pip install --no-cache-dir "cyclonedx-bom==${CYCLONEDX_BOM_VERSION}"
ENV CYCLONEDX_PY=/opt/sbom-tool/bin/cyclonedx-py
RUN python -m venv /opt/flclustering
ENV PATH=/opt/flclustering/bin:$PATH
COPY requirements/runtime.txt requirements/
COPY scripts/lock_filter.py scripts/sbom scripts/

FROM build AS control-plane-venv
ARG TORCH_VARIANT
ARG PARTICIPANT_ONLY
# A PyPI mirror may stand in for PyPI (--require-hashes still checks every file).
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL
ARG TORCH_CPU_INDEX_URL=https://download.pytorch.org/whl/cpu
# The names are patterns for lock_filter (nvidia-*), never for the shell: quoted arrays.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN read -ra drop <<<"$PARTICIPANT_ONLY" \
    && case "$TORCH_VARIANT" in \
        cuda) ;; \
        cpu) drop+=(torch torchvision "nvidia-*" "cuda-*" triton) ;; \
        *) echo "TORCH_VARIANT must be cuda or cpu, not $TORCH_VARIANT" >&2; exit 1 ;; \
    esac \
    && python scripts/lock_filter.py requirements/runtime.txt --this-python --drop "${drop[@]}" \
        > /tmp/installed.txt \
    && pip install --no-cache-dir --no-deps --require-hashes -r /tmp/installed.txt \
    && if [ "$TORCH_VARIANT" = cpu ]; then \
        grep -oE '^(torch|torchvision)==[^ ;]+' requirements/runtime.txt | sort -u \
            > /tmp/cpu-torch.txt \
        && test "$(wc -l < /tmp/cpu-torch.txt)" = 2 \
        && PIP_EXTRA_INDEX_URL="" pip install --no-cache-dir --no-deps \
            --index-url "$TORCH_CPU_INDEX_URL" -r /tmp/cpu-torch.txt \
        && pip freeze --all | grep -iE '^(torch|torchvision)==' >> /tmp/installed.txt; \
    fi
# The project itself, without dependencies, built with the lock's setuptools: no download.
# Then every module byte-compiled but one: a torch test helper in Python 3.12 syntax, which
# pip skips as well (any other file that fails to compile fails the build).
COPY pyproject.toml README.md ./
COPY services ./services
RUN pip install --no-cache-dir --no-deps --no-index --no-build-isolation . \
    && python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash \
        -x 'torch/testing/_internal/py312_intrinsics\.py$' /opt/flclustering \
    && { pip check > /tmp/check.txt || true; } \
    && if grep -vE "^flclustering [^ ]+ requires ($(tr ' ' '|' <<<"$PARTICIPANT_ONLY"))," \
        /tmp/check.txt; then exit 1; fi \
    && scripts/sbom -o /opt/flclustering/sbom.cdx.json /tmp/installed.txt

FROM control-plane-venv AS participant-venv
ARG PARTICIPANT_ONLY
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG PIP_EXTRA_INDEX_URL
# Installed beside the control plane's venv (--prefix /out/...: the same paths once copied),
# so the participant image adds one layer to the control plane's instead of another venv.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN read -ra keep <<<"$PARTICIPANT_ONLY" \
    && python scripts/lock_filter.py requirements/runtime.txt --this-python --keep "${keep[@]}" \
        > /tmp/participant-only.txt \
    && pip install --no-cache-dir --no-deps --require-hashes --prefix /out/opt/flclustering \
        -r /tmp/participant-only.txt \
    && python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash -s /out -p / \
        /out/opt/flclustering \
    && cp -a /out/opt/flclustering/. /opt/flclustering/ \
    && pip check \
    && cat /tmp/participant-only.txt >> /tmp/installed.txt \
    && scripts/sbom -o /out/opt/flclustering/sbom.cdx.json /tmp/installed.txt

# ---- the images ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin flclustering
# Byte-compiled at build time (unchecked-hash .pyc files: valid whatever the files' times), so
# a read-only root filesystem costs no compilation at start; nothing writes .pyc at run time.
COPY --from=control-plane-venv /opt/flclustering /opt/flclustering
# The labels after the big layer: a new revision or version reuses it.
ARG VERSION
ARG REVISION
ARG SOURCE
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="FLClustering"
ENV PATH=/opt/flclustering/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    TORCH_HOME=/tmp/torch \
    FLCLUSTERING_REVISION=${REVISION}
WORKDIR /tmp
USER 10001:10001
# The manifests run `python -m services.<name>`; so does the README.
ENTRYPOINT ["python", "-m"]

FROM runtime AS control-plane
LABEL org.opencontainers.image.title="flclustering-control-plane" \
      org.opencontainers.image.description="FLClustering's aggregator and clusterer (python -m services.aggregator, python -m services.clusterer)"
# clusterer gRPC, aggregator gRPC, health, clusterer and aggregator metrics
EXPOSE 50051 50052 50060 9101 9102
CMD ["services.clusterer"]

FROM runtime AS participant
COPY --from=participant-venv /out/opt/flclustering /opt/flclustering
LABEL org.opencontainers.image.title="flclustering-participant" \
      org.opencontainers.image.description="FLClustering's participant: local training on its own data (python -m services.participant)"
EXPOSE 9103
CMD ["services.participant"]
