# syntax=docker/dockerfile:1
# The authz-sidecar image: built with the same command as CI, run from distroless.
#
#   docker build -t authz-sidecar:0.1.0 .
#   docker run --rm -p 9191:9191 -p 9092:9092 \
#     -v "$PWD/my-sidecar.yaml:/etc/authz-sidecar/sidecar.yaml:ro" authz-sidecar:0.1.0
#
# Final image: the binary on gcr.io/distroless/cc-debian12 (glibc, libgcc, CA certificates
# for HTTPS to Keycloak/OpenFGA, tzdata; no shell, no package manager), user 65532. No
# config is baked in: mount one at /etc/authz-sidecar/sidecar.yaml (deploy/kubernetes does,
# from a ConfigMap). The root filesystem can be read-only: the sidecar writes nothing.
# Pin the base images by digest in your own build (`FROM ...@sha256:...`).

ARG RUST_VERSION=1.95.0

# ---- build: Debian 12 (bookworm), the same glibc as the runtime image -------------------
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# The git commit authz_sidecar_build_info reports (the context has no .git):
#   docker build --build-arg AUTHZ_GIT_COMMIT=$(git rev-parse HEAD) -t authz-sidecar:0.1.0 .
ARG AUTHZ_GIT_COMMIT=
# Only what the build reads (.dockerignore allows nothing else into the context).
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto ./proto
COPY src ./src
# The cache mounts keep the registry and target/ between builds; the binary is copied out
# of the cached target/ in the same step. Protobuf needs no protoc (protox, see build.rs).
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin authz-sidecar \
 && install -D -m 0755 target/release/authz-sidecar /out/authz-sidecar

# ---- runtime: distroless, non-root, no shell ---------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/authz-sidecar /usr/local/bin/authz-sidecar
# Numeric, so that Kubernetes' runAsNonRoot can verify it (65532 = nonroot in distroless).
USER 65532:65532
# gRPC ext_authz, ops (/healthz /readyz /metrics).
EXPOSE 9191 9092
ENTRYPOINT ["/usr/local/bin/authz-sidecar"]
CMD ["serve", "--config", "/etc/authz-sidecar/sidecar.yaml"]
