# Build: docker build -t vexil .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p vexil-server

FROM debian:bookworm-slim
COPY --from=build /src/target/release/vexil /usr/local/bin/vexil
COPY examples/flags.json /etc/vexil/flags.json
EXPOSE 8013 8014 8015 8016
ENTRYPOINT ["vexil"]
CMD ["start", "--uri", "file:/etc/vexil/flags.json"]
