# nanoseek serve: the OpenAI-compatible server on port 6006, CPU build.
#   docker build -t nanoseek .
#   docker run -p 6006:6006 nanoseek                      # the embedded SmolLM2-135M-Instruct
#   docker run -p 6006:6006 -v /models:/models nanoseek \
#       nanoseek serve --host 0.0.0.0 --model_path /models/my.gguf --precision bf16
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NANOSEEK_HOME=/opt/nanoseek

WORKDIR /app

# torch first and from the CPU index: the PyPI wheel would bring several GB of CUDA libraries,
# and with 2.13.0 installed, nanoseek's own torch range asks for nothing more
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY nanoseek ./nanoseek
RUN pip install .

# bake the default model into the image (NANOSEEK_HOME) so a container starts without network
RUN nanoseek pull

RUN useradd --create-home --uid 10001 nanoseek
USER nanoseek

EXPOSE 6006

# /health is 503 while the model loads and 200 once it serves
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:6006/health', timeout=4).status != 200)"

# `docker stop` sends SIGTERM, then SIGKILL after 10 s by default: in-flight requests get
# --shutdown-timeout seconds to finish, kept below that
STOPSIGNAL SIGTERM
CMD ["nanoseek", "serve", "--host", "0.0.0.0", "--port", "6006", "--precision", "fp32", \
     "--max_batch_tokens", "4096", "--shutdown-timeout", "8"]
