# syntax=docker/dockerfile:1
#
# redcloak's container image: built in the Rust image, run from slim Debian
# as an unprivileged user with nothing but the binary and redis-cli (for the
# health check). The configuration and the keyring are mounted, never baked
# in:
#
#   /etc/redcloak/redcloak.toml        the configuration (read-only)
#   /etc/redcloak/certs/               certificates and keys it names
#   /var/lib/redcloak/keyring.json     the keyring, mode 0600, owned by the
#                                      user the container runs as
#
# docker-compose.yml shows a complete setup with Redis behind the proxy.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The cache mounts keep the registry and compiled dependencies between
# builds; the binary is copied out of them because they are not in the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin redcloak \
    && cp target/release/redcloak /usr/local/bin/redcloak

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-tools \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/redcloak \
        --shell /usr/sbin/nologin redcloak \
    && install -d -o redcloak -g redcloak -m 0700 /var/lib/redcloak \
    && install -d -m 0755 /etc/redcloak
COPY --from=build /usr/local/bin/redcloak /usr/local/bin/redcloak

USER redcloak
WORKDIR /var/lib/redcloak
EXPOSE 6380

# The probe completes a TLS handshake and a real request: a live proxy
# answers PING from an unauthenticated client with NOAUTH. The handshake is
# not verified (the probe runs on loopback and checks liveness, not the
# certificate); a listener that requires client certificates needs
# "--cert FILE --key FILE" added, and a plaintext listener needs "--tls
# --insecure" removed, both through REDCLOAK_HEALTHCHECK.
ENV REDCLOAK_HEALTHCHECK="-h 127.0.0.1 -p 6380 --tls --insecure"
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD redis-cli $REDCLOAK_HEALTHCHECK PING 2>&1 | grep -q NOAUTH

ENTRYPOINT ["redcloak"]
CMD ["serve", "--config", "/etc/redcloak/redcloak.toml"]
