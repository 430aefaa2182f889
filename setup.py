"""Builds sparse_ops._C (CPU kernels always; CUDA kernels when torch is a CUDA build and
nvcc is found, or FORCE_CUDA=1) and ships kernels/ (Triton) as sparse_ops.kernels.

_C is compiled against one torch, whose C++ ABI changes from release to release: the build
records that torch in sparse_ops/_build_info.py (read at import, to name it when loading _C
fails), and a wheel requires exactly that torch."""
import glob
import importlib.util
import os
import sys

from setuptools import setup

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1 (pyproject.toml asks for >= 64): the wheel package's
    from wheel.bdist_wheel import bdist_wheel

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


TORCH_RANGE = "torch>=2.4"  # what the sources build against


def torch_requirement(commands, torch_version):
    """The torch a distribution built by these setup.py commands needs. A wheel holds a _C
    compiled against torch_version, so it pins that release, as torch's own extensions pin
    theirs (the local label, +cu130, is left out: a pin without one accepts every build of
    the release). An sdist, or an editable install that builds in place against the torch
    present, keeps the range."""
    if "bdist_wheel" not in commands:
        return TORCH_RANGE
    if "sdist" in commands:
        raise SystemExit("setup.py: build the sdist and the wheel in separate runs (python -m build does): "
                         f"the wheel pins torch=={torch_version}, the sdist must not")
    return "torch==" + torch_version.split("+")[0]


def write_build_info(directory, torch_version, cuda_version):
    """Records, beside _C, the torch it was compiled against (cuda_version: None when _C has
    no CUDA kernels); sparse_ops._backend compares it with the torch it runs under."""
    with open(os.path.join(directory, "_build_info.py"), "w") as f:
        f.write("# Written by setup.py when it built sparse_ops._C: the torch _C was compiled against.\n"
                f"TORCH_VERSION = {torch_version!r}\n"
                f"CUDA_VERSION = {cuda_version!r}  # None: built without CUDA kernels\n")


class PinnedWheel(bdist_wheel):
    """Writes the wheel's metadata itself, so that it pins torch (torch_requirement). pip
    prepares the metadata first, in a run that cannot tell a wheel from an editable install,
    and then hands it to bdist_wheel to reuse (--dist-info-dir); pip checks only the name and
    version of the two against each other."""

    def finalize_options(self):
        self.dist_info_dir = None
        super().finalize_options()


class NinjaBuildExtension(BuildExtension.with_options(use_ninja=True)):
    """Builds in one fixed object directory, so rebuilds are incremental (ninja), editable
    installs included (pip would otherwise compile everything in a fresh temp dir), and
    writes _build_info.py where _C goes (the source tree when in place, else the build tree
    a wheel is made from)."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = os.path.join(os.path.dirname(os.path.abspath(__file__)), "build", "temp")

    def run(self):
        super().run()
        (ext,) = self.extensions
        with_cuda = any(source.endswith(".cu") for source in ext.sources)
        write_build_info(os.path.dirname(self.get_ext_fullpath(ext.name)), torch.__version__,
                         torch.version.cuda if with_cuda else None)


def extension():
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard comes from torch's build helper. -g0: Python's CFLAGS bring -g, and debug
    # information for torch's headers made each C++ unit compile 2.2-2.8x slower (windows_cpu.o:
    # 259 s -> 107 s, 5.4 MB -> 0.13 MB, 2 loaded cores, 2026-12-07).
    cxx = ["-O3", "-g0"]
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


if __name__ == "__main__":  # also under pip (setuptools runs this file as __main__); tests import it
    setup(
        name="sparse_ops",
        version="0.1.0",
        description="CUDA and Triton kernels that turn token and window pruning in vision transformers into wall-clock speed",
        packages=["sparse_ops", "sparse_ops.attention", "sparse_ops.nn", "sparse_ops.kernels"],
        package_dir={"sparse_ops": "sparse_ops", "sparse_ops.kernels": "kernels"},
        ext_modules=[extension()],
        cmdclass={"build_ext": NinjaBuildExtension, "bdist_wheel": PinnedWheel},
        python_requires=">=3.10",
        install_requires=[torch_requirement(sys.argv[1:], torch.__version__)],
        extras_require={"timm": ["timm>=1.0", "tqdm"]},  # sparse_ops.nn, .patch, .train, .search
    )
