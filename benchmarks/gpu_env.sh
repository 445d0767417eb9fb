# Sourced by the GPU scripts: the device machine has no internet, so missing packages travel as wheels in .whl/
# (deepspeed, datasets, torchdata and their needs) and install into /tmp/site; the repo goes on PYTHONPATH.
# NVLink multicast stays off, as the device tool requires.
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
if ls .whl/*.whl >/dev/null 2>&1 && command -v nvidia-smi >/dev/null; then  # the wheels are for the GPU machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:$PWD/examples:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
