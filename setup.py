"""Build logic for alexnet_fast._C; everything else about the package lives in pyproject.toml.

A CUDAExtension (csrc/*.cpp + csrc/cpu/*.cpp + csrc/cuda/*.cu) when torch is a CUDA build and
nvcc is found, a CppExtension with the CPU kernels otherwise. Switches:
  ALEXNET_FAST_NO_CUDA=1   build the CPU kernels only
  ALEXNET_FAST_DEBUG=1     -O0 -g (and -lineinfo for nvcc)
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default 9.0)
"""
import glob
import os
import shutil
import sysconfig

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def _find_nvcc_home():
    """CUDA_HOME for torch.utils.cpp_extension, or None. torch guesses from `which nvcc`, which
    can point at a parent folder without the toolkit's headers, so prefer an explicit or the
    standard location."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return home
    if os.path.exists(os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
        return DEFAULT_CUDA_HOME
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _cuda_wheel_include_dirs():
    """Torch's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack; CUDA
    builds of torch ship them in the nvidia/cu* wheels next to torch."""
    site = sysconfig.get_paths()["purelib"]
    return sorted(d for d in glob.glob(os.path.join(site, "nvidia", "cu*", "include")) if os.path.isdir(d))


def _loaded_libstdcxx():
    """The shared libstdc++ that torch loaded into this process (Linux), or None.

    The extension links it by path. Where the linker finds no usable libstdc++.so on the
    compiler's library path, only libstdc++.a (a GCC wrapper did, even for an explicit
    ``-lstdc++``), the extension otherwise gets its own copy of the C++ exception runtime, and
    every failed TORCH_CHECK then ends the process with a segmentation fault instead of raising.
    With a usual toolchain this names the library ``-lstdc++`` would have linked anyway.
    """
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "/libstdc++.so" in line}
    except OSError:
        return None
    return sorted(paths)[0] if paths else None


def _extensions():
    import torch
    from torch.utils import cpp_extension

    debug = os.environ.get("ALEXNET_FAST_DEBUG") == "1"
    cuda_home = None if os.environ.get("ALEXNET_FAST_NO_CUDA") == "1" else _find_nvcc_home()
    use_cuda = cuda_home is not None and torch.version.cuda is not None

    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O0", "-g", "-DALEXNET_FAST_DEBUG"] if debug else ["-O3"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")])
    libstdcxx = _loaded_libstdcxx()
    if libstdcxx:
        kwargs["extra_link_args"] = [libstdcxx]
    if use_cuda:
        os.environ["CUDA_HOME"] = cuda_home
        cpp_extension.CUDA_HOME = cuda_home  # read at import time; keep it in step with the env
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc_flags = ["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["--expt-relaxed-constexpr"]  # the C++ standard is torch's choice (C++20 for torch >= 2.10)
        kwargs["include_dirs"] += _cuda_wheel_include_dirs()
        # Passed as one preprocessor number (ops.cpp stringifies it): quotes do not survive ninja.
        archs = "_".join(os.environ["TORCH_CUDA_ARCH_LIST"].replace(";", " ").replace("+PTX", "").split())
        cxx_flags += ["-DALEXNET_FAST_WITH_CUDA", f"-DALEXNET_FAST_CUDA_ARCHS={archs}"]
        kwargs["extra_compile_args"] = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        ext = cpp_extension.CUDAExtension("alexnet_fast._C", sources, **kwargs)
    else:
        kwargs["extra_compile_args"] = {"cxx": cxx_flags}
        ext = cpp_extension.CppExtension("alexnet_fast._C", sources, **kwargs)
    names = [os.path.splitext(os.path.basename(s))[0] for s in sources]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise RuntimeError(f"source basenames must be unique (ninja writes one object per name): {sorted(dup)}")
    return [ext], cpp_extension.BuildExtension.with_options(use_ninja=True)


ext_modules, build_ext = _extensions()
setup(ext_modules=ext_modules, cmdclass={"build_ext": build_ext})
