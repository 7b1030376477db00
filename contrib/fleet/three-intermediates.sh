#!/usr/bin/env bash
# A fleet on one host, for trying it out: one redis-server and three intermediates on
# loopback sharing it, plus a connector homed on relay3 and an agent that knows all three.
# Ctrl-C stops everything. Needs redis-server (Debian package redis-server) and mahole.
#
#   contrib/fleet/three-intermediates.sh [DIR]     # DIR: certificates and logs (a temp dir)
#
# Then: curl http://127.0.0.1:8080/ reaches the demo web server (python -m http.server) beside
# the connector, through whichever intermediate the agent homed on; `python -m mahole status
# --socket DIR/agent.sock` shows the home and the others' RTTs. Kill an intermediate's process
# (the pids are printed) and watch the agent re-home.
set -euo pipefail
DIR=${1:-$(mktemp -d -t mahole-fleet-XXXXXX)}
PY=${PYTHON:-python3}
REDIS_PORT=${REDIS_PORT:-6390}
mkdir -p "$DIR"
cd "$DIR"

pids=()
cleanup() { for pid in "${pids[@]}"; do kill -- "-$pid" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM
start() {  # start NAME CMD...: in its own process group, output to NAME.log
    local name=$1; shift
    setsid "$@" >"$name.log" 2>&1 &
    pids+=($!)
    echo "$name: pid $! (log $DIR/$name.log)"
}

if [ ! -f ca.crt ]; then
    $PY -m mahole certs init --dir .
    for n in 1 2 3; do
        $PY -m mahole certs issue --dir . --role intermediate --name "relay$n" --host 127.0.0.1
    done
    $PY -m mahole certs issue --dir . --role connector --name office
    $PY -m mahole certs issue --dir . --role agent --name alice
fi

start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR"
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done

for n in 1 2 3; do
    start "relay$n" $PY -m mahole intermediate --listen "127.0.0.1:$((4477 + n))" \
        --registry "redis://127.0.0.1:$REDIS_PORT/0" --allow 'alice=*' --offer 'office=*' \
        --ca ca.crt --cert "relay$n.crt" --key "relay$n.key" --control-socket "relay$n.sock"
done
start web $PY -m http.server 8000 --bind 127.0.0.1 --directory "$DIR"
# Nodes bind loopback: on one host the whole fleet stays on 127.0.0.1.
start connector $PY -m mahole connector --intermediate 127.0.0.1:4480 --bind 127.0.0.1:0 \
    --service web=tcp:127.0.0.1:8000 --ca ca.crt --cert office.crt --key office.key \
    --control-socket connector.sock
start agent $PY -m mahole agent --intermediate 127.0.0.1:4478 --intermediate 127.0.0.1:4479 \
    --intermediate 127.0.0.1:4480 --bind 127.0.0.1:0 --forward tcp:127.0.0.1:8080=web \
    --ca ca.crt --cert alice.crt --key alice.key --control-socket agent.sock

echo "fleet running in $DIR; try: curl -s http://127.0.0.1:8080/ | head"
wait
