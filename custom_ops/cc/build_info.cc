// Which TensorFlow the op library was built against, readable without loading it.
//
// The op ABI is tied to the TensorFlow minor version: a library built against
// one TensorFlow may fail to load under another, or load and misbehave.
// sparse_attention_tf/build_info.py finds this string by scanning the .so's
// bytes before `tf.load_op_library` and refuses a mismatch with a message that
// names both versions. Both builds generate custom_ops/tf_version.h (the
// version of the build's TensorFlow: Makefile from tf.__version__, Bazel from
// --define=tf_version=..., "unknown" without it); the GraphDef version comes
// from the TensorFlow headers themselves and also tells builds apart.

#include "custom_ops/tf_version.h"
#include "tensorflow/core/public/version.h"

#define SPARSE_ATTENTION_STR_(x) #x
#define SPARSE_ATTENTION_STR(x) SPARSE_ATTENTION_STR_(x)

extern "C" __attribute__((visibility("default"), used))
const char sparse_attention_tf_build_info[] =
    "SPARSE_ATTENTION_TF_BUILD_INFO{tensorflow=" SPARSE_ATTENTION_TF_VERSION
    ";graph_def_version=" SPARSE_ATTENTION_STR(TF_GRAPH_DEF_VERSION) "}";
