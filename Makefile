# Plain g++ build of the op library (no Bazel): `make ops` -> build/_sparse_attention_ops.so
# Flags mirror custom_ops/build_defs.bzl (keep in sync); TF flags come from
# tf.sysconfig of $(PYTHON) and are cached in build/tf_flags.mk.

PYTHON ?= .venv/bin/python
CXX ?= g++
BUILD_DIR := build
LIB := $(BUILD_DIR)/_sparse_attention_ops.so

CUDA_SRCS := $(wildcard custom_ops/cc/kernels/*.cu.cc custom_ops/cc/ops/*.cu.cc)
SRCS := $(filter-out $(CUDA_SRCS),$(sort $(wildcard custom_ops/cc/kernels/*.cc custom_ops/cc/ops/*.cc)))
HDRS := $(filter-out %.cu.h,$(wildcard custom_ops/cc/kernels/*.h))
OBJS := $(patsubst %.cc,$(BUILD_DIR)/obj/%.o,$(SRCS))

# Same as SPARSE_ATTENTION_COPTS / LINKOPTS in custom_ops/build_defs.bzl.
# Never -march=native. TF headers go in via -isystem (as Bazel's `includes`).
CXXFLAGS := -O3 -DNDEBUG -fPIC -pthread -Wall -Wno-psabi -fvisibility=hidden -fvisibility-inlines-hidden
LDFLAGS := -shared -pthread

.PHONY: all ops clean
all: ops
ops: $(LIB)

# TF_CFLAGS / TF_LFLAGS, regenerated when the Python env or this file changes.
$(BUILD_DIR)/tf_flags.mk: Makefile requirements.txt
	@mkdir -p $(BUILD_DIR)
	@TF_CPP_MIN_LOG_LEVEL=3 $(PYTHON) -c 'import tensorflow as tf; \
	c = tf.sysconfig.get_compile_flags(); \
	print("TF_CFLAGS := " + " ".join("-isystem " + f[2:] if f.startswith("-I") else f for f in c)); \
	print("TF_LFLAGS := " + " ".join(tf.sysconfig.get_link_flags()))' > $@.tmp 2>/dev/null \
	  || { echo "make: could not query tf.sysconfig with $(PYTHON)" >&2; rm -f $@.tmp; exit 1; }
	@mv $@.tmp $@

ifeq ($(filter clean,$(MAKECMDGOALS)),)
include $(BUILD_DIR)/tf_flags.mk
# Relink when the source list changes (e.g. a file was removed).
$(shell mkdir -p $(BUILD_DIR); echo '$(SRCS)' | cmp -s - $(BUILD_DIR)/srcs.list || echo '$(SRCS)' > $(BUILD_DIR)/srcs.list)
endif

$(BUILD_DIR)/obj/%.o: %.cc $(HDRS) $(BUILD_DIR)/tf_flags.mk
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $(TF_CFLAGS) -I. -c $< -o $@

$(LIB): $(OBJS) $(BUILD_DIR)/tf_flags.mk $(BUILD_DIR)/srcs.list
	$(CXX) $(LDFLAGS) -o $@ $(OBJS) $(TF_LFLAGS)

clean:
	rm -rf $(BUILD_DIR)
