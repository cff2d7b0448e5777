# The Sortie worker image (production: see docker-compose.yml).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY pyproject.toml README.md ./
COPY fly ./fly
COPY localfly ./localfly
COPY sortie ./sortie
COPY client ./client
COPY workflows ./workflows
COPY activities ./activities
COPY agent ./agent
COPY worker.py starter.py ./
RUN pip install --no-cache-dir . && useradd --create-home sortie \
    && mkdir -p /data && chown sortie /data
USER sortie
# SIGTERM shuts the worker down gracefully: running waits are handed to the next worker.
STOPSIGNAL SIGTERM
CMD ["python", "worker.py"]
