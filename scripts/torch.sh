# Sourced by test.sh and demo.sh: torch for running on CPU, and a line saying which build it is.
# PyPI's plain `torch` wheel for Linux x86_64 is the CUDA build (nvidia-* and triton wheels,
# several GB). The CPU build (`+cpu`) comes from PyTorch's own index, which machines limited to
# PyPI cannot reach, or from a wheel the machine's pip configuration finds (these machines carry
# torch-2.13.0+cpu in their find-links). So: the CPU build where pip finds one, else PyPI's build,
# which runs on CPU as well.
ensure_torch() {
    if ! "$PY" -c "import torch" 2>/dev/null; then
        if ! "$PY" -m pip install --quiet "torch==2.13.0+cpu" 2>/dev/null; then
            echo "note: pip finds no CPU build of torch 2.13.0; installing PyPI's (a CUDA build of several GB, which runs on CPU too)" >&2
            "$PY" -m pip install --quiet torch==2.13.0
        fi
    fi
    "$PY" -c "import torch; v = torch.__version__; print('torch', v, '(CPU build)' if '+cpu' in v else '(CUDA build; CUDA available)' if torch.cuda.is_available() else '(CUDA build, running on CPU)')"
}
