"""Build macro for the sparse attention TensorFlow custom-op library.

Every compiler/linker flag of the Bazel build lives here; BUILD files only list
sources. The plain g++ path (Makefile) mirrors these flags — keep them in sync.
"""

load("@local_config_tf//:tf_flags.bzl", "TF_CXX_FLAGS")

# Portable optimisation (never -march=native: the .so must run on any x86-64).
SPARSE_ATTENTION_COPTS = [
    "-O3",
    "-DNDEBUG",
    "-fPIC",
    "-pthread",
    "-Wall",
    "-Wno-psabi",  # GCC ABI notes for internal 64-byte vector helpers
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
] + TF_CXX_FLAGS  # e.g. -D_GLIBCXX_USE_CXX11_ABI=1 --std=c++17 -DEIGEN_MAX_ALIGN_BYTES=64

# The AMX engine's translation unit only (cc/kernels/engine_amx.cc): the
# tile instructions. Its AVX-512 code is in `#pragma GCC target` regions.
SPARSE_ATTENTION_AMX_COPTS = ["-mamx-tile", "-mamx-bf16"]

SPARSE_ATTENTION_LINKOPTS = [
    "-pthread",
]

# Sources never part of the CPU build.
CUDA_SRCS = ["**/*.cu", "**/*.cu.cc", "**/*.cu.h"]

# GPU build (`bazel build --config=cuda`, see .bazelrc): nvcc flags of the
# CUDA kernels, same as NVCCFLAGS in the Makefile. nvcc comes from
# $(CUDA_HOME)/bin, CUDA_HOME a --define (default in .bazelrc).
SPARSE_ATTENTION_CUDA_ARCHS = ["80", "90"]
SPARSE_ATTENTION_NVCC_FLAGS = [
    "-O3",
    "-DNDEBUG",
    "-std=c++17",
    "-Xcompiler",
    "-fPIC,-fvisibility=hidden",
] + ["-gencode arch=compute_%s,code=sm_%s" % (a, a) for a in SPARSE_ATTENTION_CUDA_ARCHS]

def cuda_library(name, srcs, hdrs = [], **kwargs):
    """Compiles .cu files with nvcc (one genrule each) into a cc_library.

    Bazel 4 has no CUDA rules of its own, and TensorFlow's pip package ships
    no CUDA toolchain, so nvcc runs in a genrule; the objects and a copy of
    the static CUDA runtime become the srcs of a plain cc_library. Tagged
    manual: only built as a dependency of the --config=cuda library.

    Args:
      name: the cc_library.
      srcs: .cu files.
      hdrs: headers the .cu files include (workspace-relative includes).
      **kwargs: passed to cc_library.
    """
    objs = []
    for src in srcs:
        obj = name + "_" + src.replace("/", "_").replace(".cu", "") + ".cu.pic.o"
        native.genrule(
            name = obj + "_nvcc",
            srcs = [src] + hdrs,
            outs = [obj],
            cmd = "$(CUDA_HOME)/bin/nvcc %s -I. -c $(location %s) -o $@" % (
                " ".join(SPARSE_ATTENTION_NVCC_FLAGS),
                src,
            ),
            tags = ["manual"],
        )
        objs.append(obj)
    native.genrule(
        name = name + "_cudart",
        outs = [name + "_cudart_static.pic.a"],
        cmd = "cp $(CUDA_HOME)/lib64/libcudart_static.a $@",
        tags = ["manual"],
    )
    native.cc_library(
        name = name,
        srcs = objs + [name + "_cudart_static.pic.a"],
        hdrs = hdrs,
        linkopts = ["-ldl", "-lrt", "-lpthread"],
        tags = ["manual"],
        **kwargs
    )

def _tf_version_header_impl(ctx):
    version = ctx.var.get("tf_version", "unknown")
    ctx.actions.write(
        ctx.outputs.out,
        "// Generated: the TensorFlow this build compiles against (--define=tf_version).\n" +
        "#define SPARSE_ATTENTION_TF_VERSION \"%s\"\n" % version,
    )

tf_version_header = rule(
    implementation = _tf_version_header_impl,
    doc = """Writes `out` (#define SPARSE_ATTENTION_TF_VERSION) from --define=tf_version.

    scripts/setup.sh adds `build --define=tf_version=<tf.__version__>` to the
    generated .tf_configure.bazelrc; without it the version is "unknown" and
    only the headers' GraphDef version identifies the build (build_info.cc).
    """,
    attrs = {"out": attr.output(mandatory = True)},
)

def tf_custom_op_library(name, srcs, amx_srcs = [], gpu_srcs = [], gpu_deps = [], deps = [], **kwargs):
    """Shared library loadable with tf.load_op_library(); CUDA sources are dropped.

    With --config=cuda (//custom_ops:cuda), gpu_srcs (the DEVICE_GPU
    registrations) are also compiled with -DGOOGLE_CUDA=1, in a library of
    their own so that every CPU source compiles exactly as in the CPU build,
    and gpu_deps (the nvcc-built kernels) are linked in.

    Args:
      name: output file name, e.g. "_sparse_attention_ops.so".
      srcs: kernel/op sources and headers.
      amx_srcs: framework-free sources compiled with SPARSE_ATTENTION_AMX_COPTS
        too, in a library of their own (so no other source gets those flags).
      gpu_srcs: sources compiled with GOOGLE_CUDA in the GPU build only.
      gpu_deps: libraries linked in the GPU build only.
      deps: extra cc_library deps.
      **kwargs: passed to cc_binary (e.g. visibility).
    """
    cpu_srcs = [s for s in srcs if not (s.endswith(".cu") or s.endswith(".cu.cc") or s.endswith(".cu.h"))]
    tf_deps = [
        "@local_config_tf//:tf_header_lib",
        "@local_config_tf//:libtensorflow_framework",
    ]
    amx = []
    if amx_srcs:
        native.cc_library(
            name = name + "_amx_kernels",
            srcs = amx_srcs + [s for s in cpu_srcs if s.endswith(".h")],
            copts = SPARSE_ATTENTION_COPTS + SPARSE_ATTENTION_AMX_COPTS,
            alwayslink = 1,
        )
        amx = [":" + name + "_amx_kernels"]
    gpu = []
    if gpu_srcs:
        native.cc_library(
            name = name + "_gpu_kernels",
            srcs = gpu_srcs + [s for s in cpu_srcs if s.endswith(".h")],
            copts = SPARSE_ATTENTION_COPTS + ["-DGOOGLE_CUDA=1"],
            deps = gpu_deps + tf_deps,
            alwayslink = 1,
            tags = ["manual"],
        )
        gpu = [":" + name + "_gpu_kernels"]
    native.cc_binary(
        name = name,
        srcs = cpu_srcs,
        copts = SPARSE_ATTENTION_COPTS,
        linkopts = SPARSE_ATTENTION_LINKOPTS,
        linkshared = 1,
        deps = deps + tf_deps + amx + select({
            "//custom_ops:cuda": gpu,
            "//conditions:default": [],
        }),
        **kwargs
    )
