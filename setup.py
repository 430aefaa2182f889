"""Builds sparse_ops._C (CPU kernels always; CUDA kernels when torch is a CUDA build and
nvcc is found, or FORCE_CUDA=1) and ships kernels/ (Triton) as sparse_ops.kernels."""
import glob
import importlib.util
import os

from setuptools import setup

# torch looks for the toolkit through the nvcc on PATH first, which may be a wrapper outside
# it (/usr/local/bin/nvcc here): prefer the standard location when nothing is set.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def wheel_cuda_include_dirs():
    """A pip-installed CUDA torch includes cusparse.h etc. from the nvidia-* wheels'
    headers, which a bare toolkit may lack (nvcc 13 here): use them only then."""
    if CUDA_HOME is None or os.path.exists(os.path.join(CUDA_HOME, "include", "cusparse.h")):
        return []
    spec = importlib.util.find_spec("nvidia")
    roots = spec.submodule_search_locations if spec is not None else []
    return sorted(os.path.dirname(h) for root in roots for h in glob.glob(os.path.join(root, "*", "include", "cusparse.h")))


class NinjaBuildExtension(BuildExtension.with_options(use_ninja=True)):
    """Builds in one fixed object directory, so rebuilds are incremental (ninja), editable
    installs included (pip would otherwise compile everything in a fresh temp dir)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "temp")


def extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]  # the C++ standard comes from torch's build helper
    with_cuda = os.environ.get("FORCE_CUDA") == "1" or (torch.version.cuda is not None and CUDA_HOME is not None)
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            # Without a GPU torch cannot pick the architectures itself (and fails with an IndexError).
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
        return CUDAExtension(
            "sparse_ops._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=wheel_cuda_include_dirs(),
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
            py_limited_api=False,
        )
    return CppExtension("sparse_ops._C", sources, extra_compile_args={"cxx": cxx})


setup(
    name="sparse_ops",
    version="0.1.0",
    description="CUDA and Triton kernels that turn token and window pruning in vision transformers into wall-clock speed",
    packages=["sparse_ops", "sparse_ops.attention", "sparse_ops.nn", "sparse_ops.kernels"],
    package_dir={"sparse_ops": "sparse_ops", "sparse_ops.kernels": "kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": NinjaBuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={"timm": ["timm>=1.0", "tqdm"]},  # sparse_ops.nn, .patch, .train, .search
)
