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

SPARSE_ATTENTION_LINKOPTS = [
    "-pthread",
]

# Sources never part of the CPU build.
CUDA_SRCS = ["**/*.cu", "**/*.cu.cc", "**/*.cu.h"]

def tf_custom_op_library(name, srcs, deps = [], **kwargs):
    """Shared library loadable with tf.load_op_library(); CUDA sources are dropped.

    Args:
      name: output file name, e.g. "_sparse_attention_ops.so".
      srcs: kernel/op sources and headers.
      deps: extra cc_library deps.
      **kwargs: passed to cc_binary (e.g. visibility).
    """
    cpu_srcs = [s for s in srcs if not (s.endswith(".cu") or s.endswith(".cu.cc") or s.endswith(".cu.h"))]
    native.cc_binary(
        name = name,
        srcs = cpu_srcs,
        copts = SPARSE_ATTENTION_COPTS,
        linkopts = SPARSE_ATTENTION_LINKOPTS,
        linkshared = 1,
        deps = deps + [
            "@local_config_tf//:tf_header_lib",
            "@local_config_tf//:libtensorflow_framework",
        ],
        **kwargs
    )
