# cliplab on the Ray image that matches the pinned Ray (GPU variant). Build from the repo root:
#   docker build -t cliplab:2.60.0-py311-gpu .
# No secrets are baked in: S3 and MLflow credentials come from the pod environment (see cluster/).
# The repository's jobs/ and configs/ live in /home/ray/cliplab, where cluster/rayjob-*.yaml run them.
FROM rayproject/ray:2.60.0-py311-gpu

USER ray
RUN mkdir -p /home/ray/cliplab
WORKDIR /home/ray/cliplab
COPY --chown=ray:users pyproject.toml README.md requirements.lock ./
COPY --chown=ray:users platform ./platform
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir -c requirements.lock . \
    && python -c "import cliplab, deepspeed, mlflow, webdataset, open_clip"
