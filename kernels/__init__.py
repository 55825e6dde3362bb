"""Device code for softmax_gpu: Triton kernels (*.py) and CUDA C sources (*.cu) for CuPy.

Installed, this folder is the package ``softmax_gpu.kernels``. Nothing here knows about
autograd or torch.nn; the host side (launchers, custom ops, modules) lives in softmax_gpu/.
"""
