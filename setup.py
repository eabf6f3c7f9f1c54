"""Builds lora_ext._C: CPU kernels always, CUDA kernels when they can be compiled.

Environment switches:
  LORA_EXT_BUILD_CUDA=1   require the CUDA kernels (fail if torch or nvcc cannot build them)
  LORA_EXT_BUILD_CUDA=0   build the CPU kernels only
  (unset)                 build CUDA kernels when torch is a CUDA build and nvcc is found
  TORCH_CUDA_ARCH_LIST    architectures to build for; default "8.0;9.0" when no GPU is visible
  CUDA_HOME               the CUDA toolkit folder; found from nvcc when unset
  MAX_JOBS                parallel compile jobs (ninja)
"""

import glob
import os
import shutil
import subprocess

from setuptools import setup

DEFAULT_ARCHS_WITHOUT_GPU = "8.0;9.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def _toolkit_has_cudart(folder):
    return any(os.path.exists(os.path.join(folder, lib, "libcudart.so")) for lib in ("lib64", "lib"))


def _real_nvcc_folder():
    """The toolkit folder behind the nvcc on PATH, following wrapper scripts and links."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:  # a wrapper script (`exec /path/to/nvcc "$@"`) hides the real toolkit
        with open(nvcc, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
        for word in head.split():
            if word.endswith("/bin/nvcc"):
                candidates.append(os.path.dirname(os.path.dirname(word.strip("'\""))))
    except OSError:
        pass
    candidates.append("/usr/local/cuda")
    for folder in candidates:
        if os.path.exists(os.path.join(folder, "bin", "nvcc")) and _toolkit_has_cudart(folder):
            return folder
    return None


def _choose_cuda_home():
    """Sets CUDA_HOME before torch.utils.cpp_extension reads it; returns the folder or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    folder = _real_nvcc_folder()
    if folder:
        os.environ["CUDA_HOME"] = folder
    return folder


def _want_cuda(torch, cuda_home):
    switch = os.environ.get("LORA_EXT_BUILD_CUDA", "").strip().lower()
    if switch in ("0", "false", "no", "off"):
        return False
    possible = torch.version.cuda is not None and cuda_home is not None
    if switch in ("1", "true", "yes", "on"):
        if not possible:
            raise RuntimeError(
                "LORA_EXT_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit folder={cuda_home!r} "
                "(install a CUDA build of torch and set CUDA_HOME to the toolkit folder)"
            )
        return True
    return possible


def _cuda_arch_list(torch):
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        gpu_visible = torch.cuda.is_available()
    except Exception:
        gpu_visible = False
    if gpu_visible:
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        archs = ";".join(f"{major}.{minor}" for major, minor in caps)
    else:
        archs = DEFAULT_ARCHS_WITHOUT_GPU
    # torch's cpp_extension reads this variable; with no GPU and no list it fails (IndexError).
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _extra_cuda_include_dirs():
    """Headers torch's CUDA wheels ship (cusparse.h and friends) that a bare toolkit may lack."""
    import torch

    site = os.path.dirname(os.path.dirname(torch.__file__))
    return [d for d in glob.glob(os.path.join(site, "nvidia", "*", "include")) if os.path.isdir(d)]


def _nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
        return out.strip().splitlines()[-1]
    except Exception:
        return "unknown"


def _write_build_info_header(build_desc):
    """The built module reports what it was built with (torch.ops.lora_ext.build_info())."""
    text = f'#pragma once\n#define LORA_EXT_BUILD_DESC "{build_desc}"\n'
    path = os.path.join(HERE, "csrc", "generated_build_info.h")
    if not os.path.exists(path) or open(path).read() != text:
        with open(path, "w") as f:
            f.write(text)


def _torch_uses_openmp(torch):
    return "OpenMP" in torch.__config__.parallel_info()


def build_extension():
    cuda_home = _choose_cuda_home()
    import torch
    from torch.utils import cpp_extension

    with_cuda = _want_cuda(torch, cuda_home)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    # torch adds the C++ standard its headers need. ATen's parallel_for is inline OpenMP code:
    # without -fopenmp it silently runs on one thread.
    cxx_flags = ["-O3", "-fvisibility=hidden"] + (["-fopenmp"] if _torch_uses_openmp(torch) else [])
    define_macros = []
    if with_cuda:
        archs = _cuda_arch_list(torch)
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        build_desc = f"cuda {torch.version.cuda}; archs {archs}; nvcc {_nvcc_version(cuda_home)}"
        nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                      "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                      "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"]
        extension_class = cpp_extension.CUDAExtension
        extra = {"cxx": cxx_flags, "nvcc": nvcc_flags}
        include_dirs = _extra_cuda_include_dirs()
    else:
        build_desc = "cpu only"
        extension_class = cpp_extension.CppExtension
        extra = {"cxx": cxx_flags}
        include_dirs = []
    _write_build_info_header(build_desc)
    print(f"lora_ext: building {build_desc}")
    ext = extension_class(
        name="lora_ext._C",
        sources=sources,
        extra_link_args=["-fopenmp"] if _torch_uses_openmp(torch) else [],
        include_dirs=[os.path.join(HERE, "csrc")] + include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
    )
    return ext, cpp_extension.BuildExtension


ext, build_ext = build_extension()
setup(
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
