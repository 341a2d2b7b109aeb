# syntax=docker/dockerfile:1
# One image for both roles:
#   controller: meshsec-controller ... (runs as the unprivileged user 10001, the default)
#   agent:      meshsec-agent ...      (needs NET_ADMIN, NET_BIND_SERVICE and /dev/net/tun; run as uid 0)
# Dependencies are pinned by pyproject.toml and constraints.txt (the whole tree).
# Build (docs/kubernetes.md#container-image), also multi-arch:
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/meshsec:TAG --push .

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# python-pytun ships x86_64 wheels only (2.4.2 has no source release, hence the 2.4.1 pin): build it
# from source here, the same on every architecture,
# with a compiler that stays in this stage. Debian stable's current packages (security updates).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY agent/ agent/
COPY controller/ controller/
COPY meshsec/ meshsec/
# meshsec-install-begin (tests/test_dockerfile.py runs these steps in a fresh venv)
RUN python -m venv /opt/meshsec \
 && /opt/meshsec/bin/pip install --no-cache-dir --no-binary python-pytun -c constraints.txt . \
 && /opt/meshsec/bin/python -c "import pytun" \
 && /opt/meshsec/bin/meshsec-controller --version \
 && /opt/meshsec/bin/meshsec-agent --version \
 && /opt/meshsec/bin/meshsec --version
# meshsec-install-end

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="meshsec" \
      org.opencontainers.image.description="IPsec mesh VPN: IKEv2 and ESP in userspace over TUN, with a gRPC controller" \
      org.opencontainers.image.licenses="Apache-2.0"
# iproute2: `ip rule` / `ip route show table 4301|4302` for debugging on a node (kubectl exec)
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/meshsec /opt/meshsec
RUN groupadd --system --gid 10001 meshsec \
 && useradd --system --uid 10001 --gid meshsec --home-dir /var/lib/meshsec-controller --no-create-home meshsec \
 && mkdir -p /var/lib/meshsec-controller /var/lib/meshsec /run/meshsec \
 && chown meshsec:meshsec /var/lib/meshsec-controller
ENV PATH=/opt/meshsec/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
EXPOSE 7443/tcp 7444/tcp 500/udp 4500/udp
CMD ["meshsec-controller", "--help"]
