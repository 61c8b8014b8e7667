# Larder's container image: built in a full Rust image, run from a distroless one (no shell,
# no package manager) as a non-root user with a read-only root filesystem.
#   docker build -t larder .
#   docker run --rm -p 8080:8080 -p 9901:9901 -v "$PWD/larder.yaml:/etc/larder/config/larder.yaml:ro" larder
FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits rebuild only Larder's own crates.
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY src src
RUN cargo build --release --locked --features redis,kubernetes \
    && install -D -m 0755 target/release/larder /out/larder

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/larder /usr/local/bin/larder
# Proxy (HTTP, HTTPS) and admin ports; listen addresses come from the config.
EXPOSE 8080 8443 9901
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/larder"]
CMD ["--config", "/etc/larder/config/larder.yaml"]
