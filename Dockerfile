# One image for every ResearchFlow command (receiver, serve, poll, bootstrap, batch).
# The base is pinned to an exact Python patch release on purpose; bump it deliberately.
FROM python:3.11.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /build
COPY pyproject.toml requirements.lock researchflow_cli.py researchflow_demo.py ./
COPY core ./core
COPY receiver ./receiver
COPY subscriptions ./subscriptions
COPY serving ./serving
# Every dependency at the version and hash of requirements.lock (scripts/lock.sh), then the
# package alone. psycopg[binary] and redis[hiredis] come as wheels: no compiler in the image.
RUN pip install --require-hashes -r requirements.lock \
    && pip install --no-deps . && rm -rf /build

# The services never need root: a fixed, unprivileged uid owns nothing but its home.
RUN useradd --system --uid 10001 --create-home --home-dir /home/researchflow \
        --shell /usr/sbin/nologin researchflow
USER researchflow
WORKDIR /home/researchflow

EXPOSE 8081 8082
CMD ["researchflow", "--help"]
