#!/usr/bin/env bash
# Hook for ../shared/bench/anchors.sh (PRODUCT_CMD_A / PRODUCT_CMD_B): writes a
# standalone meshsec-agent config from the ANC_* variables the script exports
# and runs the agent in the foreground. Both sides share a PSK (the benchmark
# measures the datapath; certificate auth is covered by the e2e tests).
#
#   PRODUCT_CMD_A="exec $PWD/e2e/bench/product_agent.sh" \
#   PRODUCT_CMD_B="exec $PWD/e2e/bench/product_agent.sh" \
#   PRODUCT_NAME=meshsec PRODUCT_CIPHER=aes128gcm16 PRODUCT_EXPECT_ESP=1 \
#   PRODUCT_LISTEN_A=udp:500 ../shared/bench/anchors.sh
#
# MESHSEC_ESP_PROPOSAL (default aes128gcm16) picks the ESP transform.
set -euo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
: "${ANC_SIDE:?run me from anchors.sh}" "${ANC_WORK:?}" "${ANC_UNDERLAY_IP:?}" "${ANC_PEER_UNDERLAY_IP:?}"
: "${ANC_TUN_IP:?}" "${ANC_PEER_TUN_IP:?}"
if [ "$ANC_SIDE" = A ]; then me=bench-a; peer=bench-b; else me=bench-b; peer=bench-a; fi
cfg="$ANC_WORK/meshsec.yaml"
cat > "$cfg" <<YAML
name: $me
local_address: $ANC_UNDERLAY_IP
subnets: [$ANC_TUN_IP/32]
tun: {name: meshsec0, mtu: 1400, address: $ANC_TUN_IP/32}
auth: {psk: "anchors-benchmark-psk-not-secret"}
peers:
  - name: $peer
    endpoints: [$ANC_PEER_UNDERLAY_IP]
    subnets: [$ANC_PEER_TUN_IP/32]
    esp_proposals: [${MESHSEC_ESP_PROPOSAL:-aes128gcm16}]
YAML
# PYTHONDONTWRITEBYTECODE (set in some shells) would recompile the agent on every start;
# an installed agent has its byte code cached, as it is after the first run here
exec env -u PYTHONDONTWRITEBYTECODE "$here/.venv/bin/meshsec-agent" --config "$cfg" --state-dir "$ANC_WORK/state" \
  --control-socket "$ANC_WORK/agent.sock" ${MESHSEC_AGENT_ARGS:-}
