"""Repository rule exposing the pip-installed TensorFlow to Bazel.

scripts/configure.sh writes .tf_configure.bazelrc with:
  TF_HEADER_DIR          tf.sysconfig.get_include()
  TF_SHARED_LIBRARY_DIR  tf.sysconfig.get_lib()
  TF_SHARED_LIBRARY_NAME e.g. libtensorflow_framework.so.2 (from get_link_flags())
  TF_CXX_FLAGS           tf.sysconfig.get_compile_flags() minus -I (space separated)

Creates @local_config_tf with :tf_header_lib, :libtensorflow_framework and
tf_flags.bzl (TF_CXX_FLAGS list), consumed by //custom_ops:build_defs.bzl.
"""

_ENV_VARS = [
    "TF_HEADER_DIR",
    "TF_SHARED_LIBRARY_DIR",
    "TF_SHARED_LIBRARY_NAME",
    "TF_CXX_FLAGS",
]

def _require_env(repository_ctx, name):
    value = repository_ctx.os.environ.get(name, "")
    if not value:
        fail("%s is not set; run `bash scripts/configure.sh` (or scripts/setup.sh) first." % name)
    return value

def _tf_configure_impl(repository_ctx):
    header_dir = _require_env(repository_ctx, "TF_HEADER_DIR")
    lib_dir = _require_env(repository_ctx, "TF_SHARED_LIBRARY_DIR")
    lib_name = _require_env(repository_ctx, "TF_SHARED_LIBRARY_NAME")
    cxx_flags = _require_env(repository_ctx, "TF_CXX_FLAGS").split(" ")

    repository_ctx.symlink(header_dir, "include")
    repository_ctx.symlink(lib_dir + "/" + lib_name, "lib/" + lib_name)
    repository_ctx.template(
        "BUILD",
        Label("//third_party/tf:BUILD.tpl"),
        {"%{TF_SHARED_LIBRARY_NAME}": lib_name},
    )
    repository_ctx.file(
        "tf_flags.bzl",
        "\"\"\"Generated: TensorFlow compile flags from tf.sysconfig.\"\"\"\n\n" +
        "TF_CXX_FLAGS = %r\n" % [f for f in cxx_flags if f],
    )

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = _ENV_VARS,
    local = True,
)
