#!/usr/bin/env bash
# Starts a development setup: a local redis-server on 127.0.0.1:6379 (unless
# one is already answering there) and redcloak in front of it on port 6380
# with config/dev.toml: a TLS listener with certificates from
# certs/gen-certs.sh and values sealed with a keyring in run/. Stop with
# Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
mkdir -p run

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  redis-server --port 6379 --bind 127.0.0.1 --daemonize yes \
    --dir "$PWD/run" --logfile "$PWD/run/redis.log" --pidfile "$PWD/run/redis.pid"
  for _ in $(seq 50); do
    redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "started redis-server on 127.0.0.1:6379 (stop it with: redis-cli -p 6379 shutdown nosave)"
fi

cargo build --release
certs/gen-certs.sh >/dev/null
[ -f run/keyring.json ] || target/release/redcloak keys generate --keyring run/keyring.json
cat <<'TXT'

redcloak is starting on 127.0.0.1:6380 (TLS). Connect with, for example:

  redis-cli --tls --cacert certs/ca.crt -p 6380 --user alice --pass alice-dev-password
  redis-cli --tls --cacert certs/ca.crt -p 6380 --user bob --pass bob-dev-password   (another project)

TXT
exec target/release/redcloak serve --config config/dev.toml
