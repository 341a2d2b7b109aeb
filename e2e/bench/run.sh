#!/usr/bin/env bash
# The datapath benchmark: meshsec beside the userspace anchors (veth baseline,
# wireguard-go, nebula, strongSwan libipsec) in ONE run of the shared anchors script,
# on one topology, through the product hook e2e/bench/product_agent.sh; then the
# extra figures (4 TCP streams, transport mode, nested case 3, agent RSS under load)
# from e2e/bench/extras.py. Prints Markdown tables. A benchmark, not a test.
#
# Usage (root, from anywhere):
#   e2e/bench/run.sh                       # anchors + meshsec, then the extras
#   SYSTEMS="nebula product" e2e/bench/run.sh
#   EXTRAS=0 e2e/bench/run.sh              # the anchors table only
#   EXTRAS_ARGS="--seconds 10 --no-offload" e2e/bench/run.sh
#   MESHSEC_AGENT_ARGS=--no-offload e2e/bench/run.sh   # meshsec row without offloads
#
# Environment: ANCHORS (path of anchors.sh; default ../shared/bench/anchors.sh next to
# the repository), SYSTEMS (default "veth wireguard-go nebula strongswan-aesgcm product"),
# DURATION / UDP_SMALL / OUT_JSON / OUT_MD as anchors.sh documents them.
#
# Packages: anchors.sh installs what the chosen systems need with apt-get
# (INSTALL_MISSING=1, its default): iperf3 jq tcpdump tshark, wireguard-go
# wireguard-tools, nebula, strongswan-charon strongswan-swanctl libcharon-extra-plugins
# libstrongswan-standard-plugins libstrongswan-extra-plugins. meshsec itself needs
# scripts/setup.sh (run here if .venv is missing).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
anchors=${ANCHORS:-$root/../shared/bench/anchors.sh}
[ "$(id -u)" = 0 ] || { echo "run.sh: run as root (network namespaces, TUN devices)" >&2; exit 2; }
[ -f "$anchors" ] || { echo "run.sh: anchors script not found at $anchors; set ANCHORS=/path/to/anchors.sh" >&2; exit 2; }
[ -x "$root/.venv/bin/meshsec-agent" ] || bash "$root/scripts/setup.sh"

export SYSTEMS=${SYSTEMS:-"veth wireguard-go nebula strongswan-aesgcm product"}
export PRODUCT_CMD_A="exec $root/e2e/bench/product_agent.sh"
export PRODUCT_CMD_B="exec $root/e2e/bench/product_agent.sh"
export PRODUCT_NAME=${PRODUCT_NAME:-meshsec}
export PRODUCT_DATAPATH=${PRODUCT_DATAPATH:-"userspace Python, TUN (TSO/USO) + ESP-in-UDP/4500 (GSO/GRO)"}
export PRODUCT_CIPHER=${PRODUCT_CIPHER:-"ESP AES-128-GCM-16; IKEv2 hybrid x25519+ML-KEM-768, PSK"}
export PRODUCT_VERSION=${PRODUCT_VERSION:-"$(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"}
export PRODUCT_EXPECT_ESP=1 PRODUCT_LISTEN_A=udp:500
export MESHSEC_AGENT_ARGS=${MESHSEC_AGENT_ARGS:-}

echo "# meshsec datapath benchmark ($(date -u +%Y-%m-%dT%H:%MZ), load average: $(cut -d' ' -f1-3 /proc/loadavg))"
bash "$anchors"
if [ "${EXTRAS:-1}" = 1 ]; then
  # shellcheck disable=SC2086
  "$root/.venv/bin/python" "$root/e2e/bench/extras.py" ${EXTRAS_ARGS:-}
fi
