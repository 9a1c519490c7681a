# sluice container image: docker build -t sluice .
# The final stage is distroless (glibc + libgcc, no shell, no curl) and runs as uid 65532.
# `docker build --target mock-openai -t mock-openai .` builds the mock upstream instead
# (used by deploy/docker-compose.yml's "mock" profile).

FROM rust:1-slim-bookworm AS builder
WORKDIR /src

# Dependencies first, against stub sources, so that a change to sluice's own code reuses
# this layer instead of recompiling every crate. Both workspace members' manifests are
# needed for the lock file to resolve, and every declared target must exist.
COPY Cargo.toml Cargo.lock ./
COPY mock/Cargo.toml mock/
RUN mkdir -p src mock/src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs mock/src/lib.rs \
    && echo 'fn main() {}' > mock/src/main.rs \
    && echo 'fn main() {}' > benches/estimate.rs \
    && cargo build --release --locked -p sluice \
    && rm -rf src mock/src benches

COPY src src
COPY mock/src mock/src
COPY benches benches
# COPY keeps the context's modification times, which can be older than the stub build's
# artifacts; touching makes cargo rebuild the real crates.
RUN touch src/main.rs src/lib.rs mock/src/main.rs mock/src/lib.rs \
    && cargo build --release --locked -p sluice

FROM builder AS mock-builder
RUN cargo build --release --locked -p mock-openai

FROM gcr.io/distroless/cc-debian12:nonroot AS mock-openai
COPY --from=mock-builder /src/target/release/mock-openai /usr/local/bin/mock-openai
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/mock-openai", "--listen", "0.0.0.0:9090"]

# The last stage is what a plain `docker build .` produces.
FROM gcr.io/distroless/cc-debian12:nonroot AS sluice
COPY --from=builder /src/target/release/sluice /usr/local/bin/sluice
# sluice's own default is 127.0.0.1, which inside a container is unreachable from outside it.
# Here the container's network namespace and the operator's port mapping are the boundary,
# so the image listens on every interface. It does not turn off client authentication:
# sluice refuses to listen beyond loopback unless client tokens are configured or the
# operator sets SLUICE_ALLOW_UNAUTHENTICATED=true (see deploy/README.md).
ENV SLUICE_LISTEN=0.0.0.0:8787
EXPOSE 8787
# No curl in this image: the binary probes its own /readyz (exit 0 on 200, else 1, within 2 s),
# on the address SLUICE_LISTEN names.
HEALTHCHECK --interval=15s --timeout=5s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/sluice", "healthcheck"]
# Numeric, so Kubernetes' runAsNonRoot can verify it (it cannot resolve the name "nonroot").
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/sluice"]
