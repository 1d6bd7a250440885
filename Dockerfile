# syntax=docker/dockerfile:1
# Operator image: multi-stage, slim, non-root, no build tools in the final stage.
FROM python:3.11-slim AS build
WORKDIR /src
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install . && pip uninstall -y pip setuptools

FROM python:3.11-slim
LABEL org.opencontainers.image.title="agent-access-operator" \
      org.opencontainers.image.description="Just-in-time, least-privilege access for AI agents" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN rm -rf /usr/local/lib/python3.11/ensurepip /usr/local/bin/pip* \
 && useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin operator
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["agent-access-operator"]
CMD ["run"]
