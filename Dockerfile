# Moat's image: a static binary on distroless, non-root, running `moat operator`; the operator
# also injects it (pinned by digest) as the `decrypt-model` init container, whose args
# (`decrypt ...`) replace CMD. distroless/static carries the CA bundle registries are verified with.
# docker build -t moat:dev .   (not built in this repository's CI: no container runtime there)
FROM rust:1.95-alpine AS build
RUN apk add --no-cache musl-dev
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin moat

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /src/target/release/moat /moat
USER 65532:65532
ENTRYPOINT ["/moat"]
CMD ["operator"]
