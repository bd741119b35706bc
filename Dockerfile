# Production image: Debian bookworm, the same Debian packages as `make run`, the project in a venv.
# Not exercised by the tests (no Docker engine on the build machines); keep it minimal.
FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      python3 python3-venv orthanc orthanc-dicomweb dcmtk dicom3tools ca-certificates libdeflate0 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/hilum
COPY pyproject.toml README.md ./
COPY node ./node
COPY handlers ./handlers
RUN python3 -m venv /opt/hilum/.venv && /opt/hilum/.venv/bin/pip install --no-cache-dir .
COPY rules ./rules
COPY models ./models
COPY sr_templates ./sr_templates
COPY ohif-config ./ohif-config
COPY hilum.yaml ./
# Plain HTTP beyond loopback only behind a TLS-terminating proxy; otherwise set web_tls in hilum.yaml.
ENV TCP_NODELAY=1 HILUM_DATA_DIR=/var/lib/hilum HILUM_WEB_HOST=0.0.0.0 HILUM_WEB_ALLOW_PLAIN_HTTP=true
VOLUME /var/lib/hilum
EXPOSE 11112 8080
ENTRYPOINT ["/opt/hilum/.venv/bin/hilum", "up", "--config", "/opt/hilum/hilum.yaml"]
