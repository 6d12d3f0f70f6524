"""Build of the one extension, ``sparsesam._C``.

CPU kernels (OpenMP, -O3 vectorised) are always built. CUDA kernels are
added when a GPU is visible or ``SPARSESAM_CUDA=1`` (so CI without a GPU
still compiles every ``.cu`` file); ``TORCH_CUDA_ARCH_LIST`` is always set.
``SPARSESAM_DEBUG=1`` builds with -O0 -g. Build with
``pip install --no-build-isolation -e .`` (torch must already be installed).
"""
import glob
import os

from setuptools import setup
import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

HERE = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("SPARSESAM_DEBUG", "0") == "1"


def want_cuda() -> bool:
    forced = os.environ.get("SPARSESAM_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.cuda.is_available() and CUDA_HOME is not None


def default_arch_list() -> str:
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    # No GPU to ask: Ampere SASS plus PTX that newer GPUs JIT-compile.
    return "8.0+PTX"


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    cxx = opt + ["-fopenmp", "-std=c++20"]
    extra = dict(
        extra_compile_args={"cxx": cxx},
        # libgomp.so.1: the soname torch's own bundled runtime has, so one
        # OpenMP runtime is shared with ATen's thread pool.
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )
    if want_cuda():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", default_arch_list())
        extra["extra_compile_args"]["nvcc"] = opt + ["-std=c++20", "--expt-relaxed-constexpr"]
        extra["extra_compile_args"]["cxx"].append("-DSPARSESAM_WITH_CUDA")
        return CUDAExtension("sparsesam._C", sources + rel("csrc/cuda/*.cu"), **extra)
    return CppExtension("sparsesam._C", sources, **extra)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
