# syntax=docker/dockerfile:1
# One image for both roles:
#   controller: meshsec-controller ... (runs as the unprivileged user 10001, the default)
#   agent:      meshsec-agent ...      (needs NET_ADMIN, NET_BIND_SERVICE and /dev/net/tun; run as uid 0)
# Dependencies are pinned by pyproject.toml and constraints.txt (the whole tree).

FROM python:3.11-slim-bookworm AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY agent/ agent/
COPY controller/ controller/
COPY meshsec/ meshsec/
# meshsec-install-begin (tests/test_dockerfile.py runs these steps in a fresh venv)
RUN python -m venv /opt/meshsec \
 && /opt/meshsec/bin/pip install --no-cache-dir -c constraints.txt . \
 && /opt/meshsec/bin/meshsec-controller --help >/dev/null \
 && /opt/meshsec/bin/meshsec-agent --help >/dev/null \
 && /opt/meshsec/bin/meshsec --help >/dev/null
# meshsec-install-end

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="meshsec" \
      org.opencontainers.image.description="IPsec mesh VPN: IKEv2 and ESP in userspace over TUN, with a gRPC controller" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/meshsec /opt/meshsec
RUN groupadd --system --gid 10001 meshsec \
 && useradd --system --uid 10001 --gid meshsec --home-dir /var/lib/meshsec-controller --no-create-home meshsec \
 && mkdir -p /var/lib/meshsec-controller /var/lib/meshsec /run/meshsec \
 && chown meshsec:meshsec /var/lib/meshsec-controller
ENV PATH=/opt/meshsec/bin:$PATH PYTHONUNBUFFERED=1
USER 10001
EXPOSE 7443/tcp 7444/tcp 500/udp 4500/udp
CMD ["meshsec-controller", "--help"]
