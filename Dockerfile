# Builds the `warren` binary for compose.yaml.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin warren

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/warren /usr/local/bin/warren
COPY fixtures /fixtures
WORKDIR /
ENTRYPOINT ["warren"]
