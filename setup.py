"""Build pyattn._C from csrc/ (CPU always; CUDA when nvcc and a CUDA torch are present).

The CPU kernels (csrc/cpu/*_kernel.cpp) are compiled once per instruction set (DEFAULT, AVX2,
AVX512), each with its own flags, and the right one is chosen at run time (as ATen's
DispatchStub does), so a shipped build never depends on ``-march=native``. The other sources,
csrc/*.cpp and the rest of csrc/cpu/ (the BLAS shim), are compiled once, without -m flags.
docs/design.md describes the layout.

Environment:
  PYATTN_CUDA=0|1          force the CUDA sources off / on (default: on when nvcc is found)
  PYATTN_CUDA_ARCHS="80;90a"  GPU architectures to build (default: 80 and 90a)
  PYATTN_PTXAS_VERBOSE=1   pass -Xptxas -v (register and spill report)
  PYATTN_SANITIZE=1        build the C++ code with ASan + UBSan (make test-sanitize)
  MAX_JOBS                 parallel compile jobs (honoured by torch's ninja build)
"""

import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

# torch.utils.cpp_extension reads CUDA_HOME when it is imported; /usr/local/bin/nvcc on these
# machines is a wrapper, from which torch would guess CUDA_HOME=/usr/local and fail.
if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda/bin"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME,
    BuildExtension,
    CppExtension,
    CUDAExtension,
)

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")

# (name, flags) for each CPU capability build of csrc/cpu/*.cpp. The defines are the ones
# at::vec keys on; without them Vectorized<float> is scalar code.
CPU_CAPABILITIES = [
    ("DEFAULT", ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]),
    # -mf16c (as torch's own AVX2 build): at::vec's Half conversions use F16C, which every AVX2
    # CPU has
    ("AVX2", ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]),
    (
        "AVX512",
        [
            "-DCPU_CAPABILITY=AVX512",
            "-DCPU_CAPABILITY_AVX512",
            "-mavx512f",
            "-mavx512bw",
            "-mavx512vl",
            "-mavx512dq",
            "-mfma",
            "-mf16c",
            # GCC 12 flags the self-initialised placeholder (_mm512_undefined_*) inside its own
            # AVX512 intrinsics wherever they inline, ATen's Vectorized included: false positives
            "-Wno-maybe-uninitialized",
        ],
    ),
]


def _env_flag(name):
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.lower() not in ("0", "false", "off", "no")


def _want_cuda():
    forced = _env_flag("PYATTN_CUDA")
    have_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    have_cuda_torch = torch.version.cuda is not None
    if forced is True and not (have_nvcc and have_cuda_torch):
        sys.exit(
            "PYATTN_CUDA=1 but "
            + ("nvcc was not found (set CUDA_HOME)" if not have_nvcc else "torch is a CPU build")
        )
    if forced is False:
        return False
    return have_nvcc and have_cuda_torch


def _cuda_include_dirs():
    # torch's ATen/cuda headers include cusparse.h and cublas headers, which ship in the
    # nvidia-* pip packages rather than in the toolkit on these machines.
    dirs = []
    roots = list(sys.path) + site.getsitepackages() + [site.getusersitepackages()]
    roots.append(os.path.dirname(os.path.dirname(torch.__file__)))
    for root in roots:
        for sub in ("cu13", "cu12"):
            inc = os.path.join(root, "nvidia", sub, "include")
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
        for inc in glob.glob(os.path.join(root, "nvidia", "*", "include")):
            if inc not in dirs and os.path.basename(os.path.dirname(inc)) in ("cublas", "cusparse"):
                dirs.append(inc)
    return dirs


def _cuda_arch_flags():
    archs = os.environ.get("PYATTN_CUDA_ARCHS", "80;90a").replace(",", ";").split(";")
    flags = []
    for arch in (a.strip() for a in archs):
        if arch:
            flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags


def _rel(paths):
    return sorted(os.path.relpath(p, ROOT) for p in paths)


WITH_CUDA = _want_cuda()
cpu_kernel_sources = _rel(glob.glob(os.path.join(CSRC, "cpu", "*_kernel.cpp")))
main_sources = _rel(glob.glob(os.path.join(CSRC, "*.cpp")) + glob.glob(os.path.join(CSRC, "cpu", "*.cpp")))
main_sources = [s for s in main_sources if s not in cpu_kernel_sources]
cuda_sources = _rel(glob.glob(os.path.join(CSRC, "cuda", "*.cu"))) if WITH_CUDA else []

cxx_flags = ["-O3", "-fvisibility=hidden", "-Wall", "-Wno-unused-function"]
# at::parallel_for is header code: with torch's OpenMP backend it is a `#pragma omp parallel`,
# which a build without -fopenmp silently compiles to a serial loop (every CPU kernel then ran
# on one core). Linking -fopenmp names libgomp.so.1, which resolves to the copy torch loaded.
link_flags = []
if sys.platform.startswith("linux") and "parallel backend: OpenMP" in torch.__config__.parallel_info():
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
# PYATTN_SANITIZE=1 (make test-sanitize): AddressSanitizer and UndefinedBehaviorSanitizer in the
# C++ build, every report fatal; the test process preloads their runtimes (the Makefile does).
if _env_flag("PYATTN_SANITIZE"):
    cxx_flags += [
        "-fsanitize=address,undefined",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
        "-g",
    ]
    link_flags += ["-fsanitize=address,undefined"]
define_macros = [("PYATTN_WITH_CUDA", "1" if WITH_CUDA else "0")]
include_dirs = [CSRC]
nvcc_flags = [
    "-O3",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    # torch builds with these off; keeping them off lets c10::Half/BFloat16 compile in kernels
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
] + _cuda_arch_flags()
if _env_flag("PYATTN_PTXAS_VERBOSE"):
    nvcc_flags += ["-Xptxas", "-v"]

if WITH_CUDA:
    include_dirs += _cuda_include_dirs()
    ext = CUDAExtension(
        "pyattn._C",
        main_sources + cuda_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )
else:
    ext = CppExtension(
        "pyattn._C",
        main_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )
ext.depends = _rel(
    glob.glob(os.path.join(CSRC, "**", "*.h"), recursive=True)
    + glob.glob(os.path.join(CSRC, "**", "*.cuh"), recursive=True)
)


class Build(BuildExtension):
    """Compiles csrc/cpu/*_kernel.cpp once per CPU capability and links those objects into _C."""

    def build_extension(self, extension):
        objects = []
        for name, flags in CPU_CAPABILITIES:
            out_dir = os.path.join(self.build_temp, "cpu_" + name.lower())
            objects += self.compiler.compile(
                cpu_kernel_sources,
                output_dir=out_dir,
                macros=extension.define_macros,
                include_dirs=extension.include_dirs + self.compiler.include_dirs,
                extra_postargs={"cxx": cxx_flags + flags} if self.use_ninja else cxx_flags + flags,
                depends=extension.depends,
            )
        extension.extra_objects = list(extension.extra_objects or []) + objects
        super().build_extension(extension)


if __name__ == "__main__":
    if shutil.which("ninja") is None:
        print("pyattn: ninja not found; the build falls back to slow serial compiles", file=sys.stderr)
    setup(
        # kernels/ and bench/ sit at the top of the repo (docs/design.md, "Layout") and install
        # as pyattn.kernels and pyattn.bench, so `pyattn bench` works from any install.
        packages=find_packages(include=["pyattn", "pyattn.*"]) + ["pyattn.kernels", "pyattn.bench"],
        package_dir={"pyattn.kernels": "kernels", "pyattn.bench": "bench"},
        ext_modules=[ext],
        cmdclass={"build_ext": Build},
    )
