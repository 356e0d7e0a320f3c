#!/usr/bin/env bash
# `make demo`: starts fake-iot-core with the gateway template and a factory claim in a throwaway
# directory, provisions a gateway against it with AWS's own Python device SDK (CSR flow over
# MQTT 5, then a reconnect with the issued certificate), shows what the cloud side now holds
# through the AWS control plane, and stops everything. The iotd agent takes the device's place
# once it exists (issue 3); the cloud side stays as it is here.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${IOTD_VENV:-$repo/target/venv}
fake=$repo/target/release/fake-iot-core
work=$(mktemp -d)
fake_pid=""
cleanup() {
    if [ -n "$fake_pid" ]; then kill -TERM "$fake_pid" 2>/dev/null || true; wait "$fake_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

[ -x "$fake" ] || { echo "demo: $fake is missing; run 'make demo', which builds it" >&2; exit 1; }
[ -x "$venv/bin/python" ] || { echo "demo: no Python venv at $venv; run 'make demo', which creates it" >&2; exit 1; }

# The ready line arrives on a FIFO so that we wait for readiness, not for a fixed time.
mkfifo "$work/ready"
"$fake" --state-dir "$work/state" --template "gateway=$repo/tests/fake-iot-core/templates/gateway.json" \
    --claim factory=gateway >"$work/ready" &
fake_pid=$!
read -r ready <"$work/ready"
json() { "$venv/bin/python" -c "import json,sys; d=json.loads(sys.argv[1]); print(eval('d'+sys.argv[2]))" "$ready" "$1"; }
port=$(json "['mqtt']" | cut -d: -f2)
http=$(json "['http']")
echo "fake-iot-core is up: MQTT on port $port (mutual TLS), control plane at $http"

echo "provisioning gateway 0042 with AWS's device SDK (CreateCertificateFromCsr + RegisterThing, MQTT 5)..."
result=$("$venv/bin/python" "$repo/tests/interop/fleet_provision.py" --endpoint localhost --port "$port" \
    --ca "$(json "['rootCa']")" --cert "$(json "['claims']['factory']['cert']")" --key "$(json "['claims']['factory']['key']")" \
    --template gateway --flow csr --protocol mqtt5 --client-id demo-claim --param SerialNumber=0042 --param Site=demo \
    --out-dir "$work/device")
"$venv/bin/python" - "$result" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
print(f"  thing name:     {r['thingName']}")
print(f"  certificate id: {r['certificateId']}")
print(f"  device config:  {json.dumps(r['deviceConfiguration'])}")
print(f"  reconnected with the issued certificate: {r['reconnected']}")
print(f"  time taken:     {r['seconds']:.2f} s (claim connect to production connect)")
PY
thing=$("$venv/bin/python" -c "import json,sys; print(json.loads(sys.argv[1])['thingName'])" "$result")
cert=$("$venv/bin/python" -c "import json,sys; print(json.loads(sys.argv[1])['certificateId'])" "$result")
echo "what the cloud side holds now (boto3 'iot' client against the fake):"
"$venv/bin/python" "$repo/tests/interop/control_plane.py" --http "$http" inspect --thing "$thing" --certificate-id "$cert"
