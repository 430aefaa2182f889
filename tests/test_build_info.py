"""The torch sparse_ops._C was built against: recorded by the build, pinned by a wheel, named
by the import error when another torch is installed (issue 18 item 5)."""
import importlib.machinery
import os
import re
import runpy
import shutil
import subprocess
import sys
import warnings
import zipfile

import pytest
import torch

from sparse_ops import _backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OTHER_TORCH = ("2.4.0+cu118", "11.8")  # a torch that is not the one running these tests


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's globals, without running setup() (it only does so as __main__)."""
    monkeypatch.setattr(os, "environ", os.environ.copy())  # it defaults CUDA_HOME there
    return runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="sparse_ops_setup")


def undefined_symbol():
    raise ImportError("sparse_ops/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev")


def test_mismatch_names_both_torches(monkeypatch):
    monkeypatch.setattr(_backend, "_built_for", lambda: OTHER_TORCH)
    monkeypatch.setattr(_backend, "_import_extension", undefined_symbol)
    with pytest.raises(ImportError) as info:
        _backend._load_extension()
    message = str(info.value)
    assert message.startswith(f"sparse_ops._C was built for torch 2.4.0+cu118 (CUDA 11.8) but torch {torch.__version__} ")
    assert "rebuild with `pip install --no-build-isolation --no-deps -e .` or install the matching torch" in message
    assert "undefined symbol" in message
    assert isinstance(info.value.__cause__, ImportError)


def test_mismatch_of_cuda_only(monkeypatch):
    other_cuda = "12.1" if torch.version.cuda != "12.1" else "11.8"
    monkeypatch.setattr(_backend, "_built_for", lambda: (torch.__version__, other_cuda))
    monkeypatch.setattr(_backend, "_import_extension", undefined_symbol)
    expected = f"built for torch {torch.__version__} (CUDA {other_cuda}) but torch {torch.__version__} ("
    with pytest.raises(ImportError, match=re.escape(expected)):
        _backend._load_extension()


def test_import_of_a_broken_build_names_its_torch(tmp_path):
    """`import sparse_ops` itself, in a fresh interpreter, from a copy of the package whose _C
    cannot load (not a shared library at all) and whose build info names another torch."""
    package = tmp_path / "sparse_ops"
    shutil.copytree(os.path.join(ROOT, "sparse_ops"), package, symlinks=True,
                    ignore=shutil.ignore_patterns("_C.*", "_build_info.py", "__pycache__"))
    (package / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not an ELF file")
    (package / "_build_info.py").write_text(f"TORCH_VERSION = {OTHER_TORCH[0]!r}\nCUDA_VERSION = {OTHER_TORCH[1]!r}\n")
    env = {k: v for k, v in os.environ.items() if k != "SPARSE_OPS_BACKEND"}
    env["PYTHONPATH"] = str(tmp_path)
    result = subprocess.run([sys.executable, "-c", "import sparse_ops"], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert (f"ImportError: sparse_ops._C was built for torch 2.4.0+cu118 (CUDA 11.8) but torch {torch.__version__}"
            in result.stderr), result.stderr


def test_same_torch_keeps_the_fallback(monkeypatch):
    """A _C that fails to load for another reason, under the torch it was built for, or with
    nothing recorded, or a _C that is simply missing: the plain-PyTorch fallback, as before."""
    monkeypatch.setattr(_backend, "_import_extension", undefined_symbol)
    for built_for in [(torch.__version__, torch.version.cuda), (torch.__version__, None), None]:
        monkeypatch.setattr(_backend, "_built_for", lambda: built_for)
        extension, reason = _backend._load_extension()
        assert extension is None and reason.startswith("ImportError: ") and "undefined symbol" in reason

    def missing():
        raise ModuleNotFoundError("No module named 'sparse_ops._C'", name="sparse_ops._C")

    monkeypatch.setattr(_backend, "_import_extension", missing)
    monkeypatch.setattr(_backend, "_built_for", lambda: OTHER_TORCH)  # a _build_info.py left behind
    extension, reason = _backend._load_extension()
    assert extension is None and reason == "ModuleNotFoundError: No module named 'sparse_ops._C'"


def test_loaded_under_another_torch_warns(monkeypatch):
    loaded = object()
    monkeypatch.setattr(_backend, "_import_extension", lambda: loaded)
    monkeypatch.setattr(_backend, "_built_for", lambda: OTHER_TORCH)
    with pytest.warns(RuntimeWarning, match=r"built for torch 2\.4\.0\+cu118 .* \(it loaded, but may misbehave\)"):
        assert _backend._load_extension() == (loaded, None)
    monkeypatch.setattr(_backend, "_built_for", lambda: (torch.__version__, torch.version.cuda))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _backend._load_extension() == (loaded, None)


def test_reference_backend_loads_nothing(monkeypatch):
    monkeypatch.setenv("SPARSE_OPS_BACKEND", "reference")
    monkeypatch.setattr(_backend, "_import_extension", undefined_symbol)
    monkeypatch.setattr(_backend, "_built_for", lambda: OTHER_TORCH)
    assert _backend._load_extension() == (None, "SPARSE_OPS_BACKEND=reference")


@pytest.mark.parametrize("commands, requirement", [
    (["bdist_wheel", "--dist-dir", "dist"], "torch==2.14.1"),          # pip wheel / pip install . / python -m build
    (["--quiet", "bdist_wheel"], "torch==2.14.1"),
    (["editable_wheel", "--dist-dir", "d"], "torch>=2.4"),              # pip install -e .
    (["dist_info", "--output-dir", "d"], "torch>=2.4"),                 # pip's metadata step
    (["sdist"], "torch>=2.4"),
    (["build_ext", "--inplace"], "torch>=2.4"),
    (["develop"], "torch>=2.4"),
])
def test_wheel_pins_its_torch(setup_py, commands, requirement):
    assert setup_py["torch_requirement"](commands, "2.14.1+cu130") == requirement


def test_wheel_and_sdist_in_one_run_refused(setup_py):
    with pytest.raises(SystemExit, match="separate runs"):
        setup_py["torch_requirement"](["sdist", "bdist_wheel"], "2.14.1")


def test_wheel_metadata_pins_torch_under_pip(tmp_path):
    """pip's sequence for `pip install .` / `pip wheel .`, without compiling: dist_info (the
    metadata pip resolves with: the range), then bdist_wheel handed that metadata to reuse;
    the wheel still pins the torch present. (--skip-build packs whatever build/ holds.)"""
    def setup(*args):
        result = subprocess.run([sys.executable, "setup.py", "-q", *args], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr

    (tmp_path / "meta").mkdir()
    setup("dist_info", "--output-dir", str(tmp_path / "meta"))
    (prepared,) = (tmp_path / "meta").glob("*.dist-info")
    assert "Requires-Dist: torch>=2.4\n" in (prepared / "METADATA").read_text()
    setup("egg_info", "--egg-base", str(tmp_path), "bdist_wheel", "--skip-build", "--dist-info-dir", str(prepared),
          "--bdist-dir", str(tmp_path / "bdist"), "--dist-dir", str(tmp_path / "dist"))
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        metadata = archive.read(f"{prepared.name}/METADATA").decode()
    assert f"Requires-Dist: torch=={torch.__version__.split('+')[0]}\n" in metadata


@pytest.mark.parametrize("cuda_version", ["13.0", None])
def test_written_build_info_reads_back(setup_py, tmp_path, cuda_version):
    setup_py["write_build_info"](str(tmp_path), "2.14.1+cu130", cuda_version)
    info = runpy.run_path(str(tmp_path / "_build_info.py"))
    assert (info["TORCH_VERSION"], info["CUDA_VERSION"]) == ("2.14.1+cu130", cuda_version)


@pytest.mark.skipif(os.environ.get("SPARSE_OPS_REQUIRE_EXT") != "1",
                    reason="`make test` sets SPARSE_OPS_REQUIRE_EXT=1 after building the extension")
def test_build_recorded_this_torch():
    """The build (`make build`: an editable install) wrote _build_info.py beside _C, naming
    the torch the tests run under."""
    assert _backend.extension is not None, _backend.load_error
    recorded = os.path.join(os.path.dirname(_backend.extension.__file__), "_build_info.py")
    assert os.path.isfile(recorded), f"{recorded} is missing: setup.py's build_ext did not write it"
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("sparse_ops::gather_rows", "CUDA")
    assert _backend._built_for() == (torch.__version__, torch.version.cuda if has_cuda else None)
    assert _backend.abi_mismatch(_backend._built_for()) is None
