#!/usr/bin/env bash
# Validates docker-compose.yml where a docker client is installed: with the
# compose plugin (`docker compose`) when it is there, else with Debian's
# docker-compose, installed when missing. No engine is needed to validate.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker >/dev/null 2>&1; then
  echo "check-compose: no docker client here; skipping the compose file check"
  exit 0
fi

# The compose file refuses to start without a Redis password; any value
# serves for validation.
export REDIS_PASSWORD=compose-validation-only

if docker compose version >/dev/null 2>&1; then
  docker compose config -q
else
  if ! command -v docker-compose >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
  fi
  docker-compose config -q
fi
echo "check-compose: docker-compose.yml is valid"
