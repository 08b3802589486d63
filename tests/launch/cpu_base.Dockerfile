# A stand-in for the NGC PyTorch base image where no registry is reachable: Debian bookworm
# (imported from a debootstrap root with python3 and python3-venv), Python 3.11 in a virtual
# environment on PATH (as NGC's python is), and CPU torch from the local wheel in the context.
# pip reaches PyPI through the host's CA bundle, kept beside the image's own (PIP_CERT).
ARG DEBIAN_IMAGE=k2train-test/debian:bookworm
FROM ${DEBIAN_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY host-ca.crt /usr/local/share/k2train-test/host-ca.crt
ENV PIP_CERT=/usr/local/share/k2train-test/host-ca.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
COPY torch-*.whl /tmp/wheels/
RUN python3 -m venv /opt/venv \
    && pip install --no-cache-dir /tmp/wheels/torch-*.whl \
    && rm -rf /tmp/wheels
