# The one warren image: the release `warren` binary, run as a non-root user.
# compose.yaml builds it once (as warren:local) for every service; the
# Kubernetes manifests under deploy/kubernetes/ run the same image.
#
#   docker build -t warren:local .
#   docker run --rm warren:local demo     # needs DATABASE_URL and AMQP_URL

# --- build ---------------------------------------------------------------
# The same Debian release as the runtime stage, so the binary finds the
# glibc it was linked against.
FROM rust:1.95-trixie AS build
WORKDIR /src

# Dependencies first, in a layer of their own: the manifests and lock file
# with stub sources. This layer (the long part of the build) is reused
# until a Cargo.toml or Cargo.lock changes; an edit to warren's own code
# only rebuilds the layer below. Every workspace member is listed, as cargo
# loads the whole workspace; a new member needs a line here too. The stubs'
# own artefacts are removed at the end: the real sources, copied below with
# mtimes that may be older than them, must not pass for up to date.
COPY Cargo.toml Cargo.lock ./
COPY events/Cargo.toml events/
COPY transport/Cargo.toml transport/
COPY producers/Cargo.toml producers/
COPY consumers/Cargo.toml consumers/
COPY host/Cargo.toml host/
COPY services/Cargo.toml services/
COPY cli/Cargo.toml cli/
COPY drills/Cargo.toml drills/
COPY testkit/Cargo.toml testkit/
COPY examples/quickstart/Cargo.toml examples/quickstart/
RUN set -eu; \
    for crate in events transport producers consumers host services cli drills testkit examples/quickstart; do \
        mkdir -p "$crate/src"; : > "$crate/src/lib.rs"; \
    done; \
    echo 'fn main() {}' > cli/src/main.rs; \
    echo 'fn main() {}' > drills/src/main.rs; \
    rm examples/quickstart/src/lib.rs; echo 'fn main() {}' > examples/quickstart/src/main.rs; \
    mkdir -p events/benches; echo 'fn main() {}' > events/benches/codec.rs; \
    cargo build --release --locked -p warren-cli; \
    cargo clean --release -p warren-events -p warren-transport -p warren-producers -p warren-consumers \
        -p warren -p warren-shop -p warren-cli -p warren-drills

# warren itself. The demo fixtures are compiled into the binary
# (include_str!), so `warren demo` needs no file from the repository.
COPY . .
RUN cargo build --release --locked --bin warren

# --- runtime -------------------------------------------------------------
FROM debian:trixie-slim
# ca-certificates: amqps:// and sslmode=require verify servers against the
# system's roots. curl: the compose health check asks GET /ready over HTTP
# with a real client (status code, timeout); it is small and is also what
# one reaches for when debugging a container.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
# A numeric UID/GID, so Kubernetes' runAsNonRoot can verify it without
# reading /etc/passwd.
RUN groupadd --system --gid 10001 warren \
    && useradd --system --uid 10001 --gid warren --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin warren
COPY --from=build /src/target/release/warren /usr/local/bin/warren
USER 10001:10001
WORKDIR /
# Inside a container the HTTP API must listen beyond loopback to be
# reached at all; logs are JSON for the container runtime's log drivers.
ENV WARREN_HTTP=0.0.0.0:8080 \
    WARREN_LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["warren"]
CMD ["run"]
