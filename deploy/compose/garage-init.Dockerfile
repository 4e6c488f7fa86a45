# The garage CLI plus a shell, for the one-shot `garage-init` service in deploy/compose.yaml.
FROM dxflrs/garage:v2.5.0 AS garage
FROM debian:bookworm-slim
COPY --from=garage /garage /usr/local/bin/garage
COPY deploy/compose/garage-init.sh /usr/local/bin/garage-init
ENTRYPOINT ["bash", "/usr/local/bin/garage-init"]
