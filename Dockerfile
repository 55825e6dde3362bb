# softmax-gpu benchmark image. `docker run --gpus all softmax-gpu` runs `python -m bench --quick`
# and writes its JSON, CSV and plot to /results (mount a folder there to keep them).
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# Triton builds a small C launcher at run time, so it needs gcc and the Python headers.
# Unpinned on purpose: Ubuntu replaces these versions with security updates.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv gcc \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 bench \
    && python3 -m venv /opt/venv \
    && mkdir -p /results /home/bench/.triton /home/bench/.cupy \
    && chown -R bench:bench /opt/venv /results /home/bench

ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    TRITON_CACHE_DIR=/home/bench/.triton \
    CUPY_CACHE_DIR=/home/bench/.cupy \
    SOFTMAX_GPU_BENCH_OUT=/results

USER 1000:1000
WORKDIR /home/bench/softmax-gpu

# Pinned: the torch/triton pair the project's GPU checks ran on, and CuPy for CUDA 12.
RUN pip install torch==2.11.0 triton==3.6.0 cupy-cuda12x==13.6.0

COPY --chown=bench:bench pyproject.toml README.md ./
COPY --chown=bench:bench kernels ./kernels
COPY --chown=bench:bench softmax_gpu ./softmax_gpu
COPY --chown=bench:bench bench ./bench
# The package itself, from this folder; its bench extra brings Liger-Kernel and QuACK when they install.
# hadolint ignore=DL3013
RUN pip install ".[bench,cupy]"

VOLUME ["/results"]
ENTRYPOINT ["python", "-m", "bench"]
CMD ["--quick"]
