#!/usr/bin/env bash
# Makes throwaway development certificates for redcloak and Redis with the
# openssl command line: a CA, a server certificate for the proxy's listener,
# one for Redis (server and client use), and a client certificate for alice.
#
# Usage: certs/gen-certs.sh [--force] [DIR]
#
# DIR defaults to the directory holding this script. Existing certificates
# are left alone unless --force is given. These are for development and
# tests only: the CA key sits beside the certificates it signs.
set -euo pipefail

usage() {
    sed -n '2,11s/^# \{0,1\}//p' "$0"
}

force=0
dir=""
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h | --help)
            usage
            exit 0
            ;;
        -*)
            echo "gen-certs.sh: unknown option $arg" >&2
            exit 2
            ;;
        *)
            if [[ -n "$dir" ]]; then
                echo "gen-certs.sh: one directory only" >&2
                exit 2
            fi
            dir="$arg"
            ;;
    esac
done
dir="${dir:-$(dirname "$0")}"

command -v openssl >/dev/null || {
    echo "gen-certs.sh: the openssl command is needed (apt-get install openssl)" >&2
    exit 1
}

files=(ca.crt ca.key server.crt server.key redis.crt redis.key client.crt client.key)
if [[ "$force" == 0 ]]; then
    present=0
    for f in "${files[@]}"; do
        [[ -e "$dir/$f" ]] && present=$((present + 1))
    done
    if [[ "$present" == "${#files[@]}" ]]; then
        echo "certificates already in $dir; use --force to make new ones"
        exit 0
    elif [[ "$present" != 0 ]]; then
        # Leaves must chain to the CA beside them, so all are made anew or
        # none; replacing some silently could discard a CA still in use.
        echo "gen-certs.sh: $dir holds some of the certificates but not all; use --force" >&2
        exit 1
    fi
fi

mkdir -p "$dir"
umask 077
# Built beside the destination, so that the final moves are renames.
work="$(mktemp -d "$dir/.gen-certs.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# One openssl configuration for every certificate, so the result does not
# depend on the system's openssl.cnf.
cat >"$work/openssl.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no

[dn]
CN = unused

[ca]
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash

[server]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[redis]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, DNS:redis
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid

[client]
basicConstraints = critical, CA:false
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF

# A PKCS#8 RSA key (RSA, so that keyEncipherment is a meaningful usage).
new_key() {
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1" 2>/dev/null
}

serial() {
    echo "0x$(openssl rand -hex 16)"
}

new_key "$work/ca.key"
openssl req -config "$work/openssl.cnf" -new -x509 -sha256 -days 3650 \
    -key "$work/ca.key" -subj "/CN=redcloak development CA $(openssl rand -hex 4)" \
    -extensions ca -set_serial "$(serial)" -out "$work/ca.crt"

# leaf NAME COMMON_NAME SECTION: a key and a CA-signed certificate.
leaf() {
    new_key "$work/$1.key"
    openssl req -config "$work/openssl.cnf" -new -key "$work/$1.key" \
        -subj "/CN=$2" -out "$work/$1.csr"
    openssl x509 -req -sha256 -days 825 -in "$work/$1.csr" \
        -CA "$work/ca.crt" -CAkey "$work/ca.key" -set_serial "$(serial)" \
        -extfile "$work/openssl.cnf" -extensions "$3" -out "$work/$1.crt" 2>/dev/null
}

leaf server localhost server
leaf redis redis redis
leaf client alice client

# Keys are 0600; certificates are public. Each file is moved into place
# whole, so a running proxy reloading on SIGHUP never reads half a file.
for f in "${files[@]}"; do
    case "$f" in
        *.key) chmod 600 "$work/$f" ;;
        *.crt) chmod 644 "$work/$f" ;;
    esac
    mv -f "$work/$f" "$dir/$f"
done
echo "development certificates written to $dir"
