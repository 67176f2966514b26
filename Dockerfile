# Kiln for CUDA GPU nodes: the base image's PyTorch, DeepSpeed, flash-attn, then Kiln and its dependencies.
#   docker build -t kiln:0.1.0 .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 -v /data:/data kiln:0.1.0 \
#       torchrun --nproc_per_node=8 -m src.train +experiment=stage1 hydra.run.dir=/data/runs/stage1 ...
# Build time is dominated by flash-attn: no prebuilt flash-attn wheel matches torch 2.13, so it compiles from source
# for the architectures in FLASH_ATTN_CUDA_ARCHS (typically 30-90 min, depending on cores; each of the MAX_JOBS
# parallel nvcc jobs needs a few GB of RAM). Everything else takes minutes. See docs/cluster.md.

# torch 2.13.0 (the version Kiln is developed against) with CUDA 12.6, cuDNN 9 and nvcc (devel: flash-attn compiles
# here and DeepSpeed JIT-compiles its ops at run time). CUDA 12.6 covers A100 and H100 (sm_80, sm_90); for newer GPUs
# use a CUDA 12.8+ tag of the same torch version and add their architecture to FLASH_ATTN_CUDA_ARCHS.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-devel

ARG MAX_JOBS=8
ARG FLASH_ATTN_CUDA_ARCHS="80;90"

# PIP_BREAK_SYSTEM_PACKAGES only matters where the image's Python is marked externally managed.
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

# Keep the image's CUDA build of torch: every later pip install is constrained to exactly this version, so no
# dependency can replace it with another build.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /etc/pip-constraints.txt
ENV PIP_CONSTRAINT=/etc/pip-constraints.txt

# DeepSpeed (ZeRO-3), and what it and the flash-attn build below need at build and run time. Kiln uses torch's
# AdamW, so no DeepSpeed op is prebuilt.
RUN pip install deepspeed==0.19.8 ninja==1.13.2 packaging==26.2 psutil==7.2.2 wheel==0.48.0

# flash-attn, compiled against the image's torch and nvcc (FLASH_ATTENTION_FORCE_BUILD skips the search for a
# prebuilt wheel, which would find none). A layer of its own: it takes most of the build and changes least.
# hadolint ignore=DL3059
RUN MAX_JOBS=${MAX_JOBS} FLASH_ATTN_CUDA_ARCHS=${FLASH_ATTN_CUDA_ARCHS} FLASH_ATTENTION_FORCE_BUILD=TRUE \
    pip install flash-attn==2.8.3 --no-build-isolation

WORKDIR /workspace/kiln
# Kiln's dependencies first, read from pyproject.toml (tomllib: Python >= 3.11, as in the image), so that this
# layer stays cached while only the code changes: the base ones and the `dev` extra (pytest, ruff, shellcheck,
# hadolint), which `bash launch/gpu_checks.sh` and the test suite need inside the image.
COPY pyproject.toml ./
RUN python -c "import tomllib as t; p = t.load(open('pyproject.toml', 'rb'))['project']; \
print(*p['dependencies'], *p['optional-dependencies']['dev'], sep='\n')" > /tmp/kiln-requirements.txt \
    && pip install -r /tmp/kiln-requirements.txt
# Then Kiln itself, editable: `-m src.train` runs from this directory, and conf/ and tests/fixtures come along.
COPY . .
RUN pip install --no-deps -e .

# No entrypoint: the command is what `docker run IMAGE ...` is given (torchrun, python -m src.sample, bash).
CMD ["bash"]
