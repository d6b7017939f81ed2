# syntax=docker/dockerfile:1
# Vexil's production image: the `vexil` binary on a distroless, non-root base.
#
#   docker build -t vexil .
#   docker run --rm -p 8013-8016:8013-8016 vexil                      # serves /etc/vexil/flags.json
#   docker run --rm -p 8013-8016:8013-8016 -v vexil-data:/var/lib/vexil vexil   # keep the SQLite store
#
# Dependencies are compiled in a layer of their own (cargo-chef: the "recipe" is the workspace's
# manifests and lock file only), so a change to Vexil's sources rebuilds Vexil's crates, not the
# ~400 crates below them.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# --- cargo-chef, once ----------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

# --- the recipe: manifests and lock file of the workspace (crates/*, tests/) -----------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- dependencies (cached until Cargo.toml/Cargo.lock change), then Vexil -------------------------
FROM chef AS build
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked -p vexil-server --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p vexil-server \
 && install -D -m 0755 target/release/vexil /out/usr/local/bin/vexil \
 && install -d -m 0750 /out/var/lib/vexil \
 && install -D -m 0644 examples/flags.json /out/etc/vexil/flags.json

# --- runtime: glibc + CA certificates, no shell, uid/gid 65532 ("nonroot") ------------------------
FROM ${RUNTIME_IMAGE}
COPY --from=build /out/usr/local/bin/vexil /usr/local/bin/vexil
COPY --from=build /out/etc/vexil/flags.json /etc/vexil/flags.json
# The embedded SQLite store (`vexil serve` without --database-url: sqlite:vexil.db) lives in the
# working directory; mount a volume here to keep it. (/out/var/lib/ is copied, not .../vexil, so
# that the directory itself, not only its contents, belongs to the runtime user.)
COPY --from=build --chown=65532:65532 /out/var/lib/ /var/lib/
WORKDIR /var/lib/vexil
USER 65532:65532
# 8013 gRPC/Connect/gRPC-web evaluation + vexil.v1, 8014 management (/healthz, /readyz, /metrics),
# 8015 flagd sync, 8016 OFREP and vexil.v1 JSON.
EXPOSE 8013 8014 8015 8016
# `vexil health` GETs http://127.0.0.1:8014/readyz and exits 0 on 200 (no shell or curl needed);
# with another management port, set VEXIL_HEALTH_URL.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 CMD ["vexil", "health"]
# On SIGTERM Vexil answers 503 on /readyz for --shutdown-delay (5 s), then drains for up to
# --shutdown-timeout (20 s): give it `docker run --stop-timeout 30` (compose: stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["vexil"]
CMD ["serve", "--uri", "file:/etc/vexil/flags.json"]
