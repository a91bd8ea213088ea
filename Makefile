# Plain g++ build of the op library (no Bazel): `make ops` -> build/_sparse_attention_ops.so
# Flags mirror custom_ops/build_defs.bzl (keep in sync); TF flags come from
# tf.sysconfig of $(PYTHON) and are cached in build/tf_flags.mk, rebuilt (and
# every object with them) when the TensorFlow that $(PYTHON) imports changes.
# `BUILD_DIR=...` builds elsewhere (setup.py: pip's build, against the build
# environment's TensorFlow). `make wheel [DIST=dist]`: the pip wheel of this
# library (scripts/build_pip_pkg.sh), no Bazel needed.
#
# GPU build: `make ops GPU=1` -> build/gpu/_sparse_attention_ops.so, the same
# library plus the CUDA kernels (custom_ops/cuda/*.cu, nvcc for CUDA_ARCHS) and
# their DEVICE_GPU registrations (-DGOOGLE_CUDA=1). Load it with
# SPARSE_ATTENTION_TF_OPS=build/gpu/_sparse_attention_ops.so.

PYTHON ?= .venv/bin/python
CXX ?= g++
GPU ?= 0
BUILD_DIR := $(if $(filter 1,$(GPU)),build/gpu,build)
LIB := $(BUILD_DIR)/_sparse_attention_ops.so

CUDA_SRCS := $(wildcard custom_ops/cc/kernels/*.cu.cc custom_ops/cc/ops/*.cu.cc)
SRCS := $(filter-out $(CUDA_SRCS),$(sort $(wildcard custom_ops/cc/kernels/*.cc \
  custom_ops/cc/ops/*.cc))) custom_ops/cc/build_info.cc
HDRS := $(filter-out %.cu.h,$(wildcard custom_ops/cc/kernels/*.h))
OBJS := $(patsubst %.cc,$(BUILD_DIR)/obj/%.o,$(SRCS))

# Same as SPARSE_ATTENTION_COPTS / LINKOPTS in custom_ops/build_defs.bzl.
# Never -march=native. TF headers go in via -isystem (as Bazel's `includes`).
CXXFLAGS := -O3 -DNDEBUG -fPIC -pthread -Wall -Wno-psabi -fvisibility=hidden -fvisibility-inlines-hidden
LDFLAGS := -shared -pthread

# GPU=1 only: same as SPARSE_ATTENTION_NVCC_FLAGS in custom_ops/build_defs.bzl.
ifeq ($(GPU),1)
CUDA_HOME ?= /usr/local/cuda
NVCC ?= $(CUDA_HOME)/bin/nvcc
CUDA_ARCHS ?= 80 90
NVCCFLAGS := -O3 -DNDEBUG -std=c++17 -Xcompiler -fPIC,-fvisibility=hidden -I. \
  $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a))
CUDA_KERNEL_SRCS := $(sort $(wildcard custom_ops/cuda/*.cu))
CUDA_HDRS := $(wildcard custom_ops/cuda/*.h)
HDRS_GPU := $(CUDA_HDRS)
OBJS_GPU := $(patsubst %.cu,$(BUILD_DIR)/obj/%.cu.o,$(CUDA_KERNEL_SRCS))
# cudart linked statically: the .so needs no libcudart of this CUDA version at run time.
LIBS_GPU := -L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt
# Only the DEVICE_GPU registrations (*_gpu.cc) see GOOGLE_CUDA: the CPU sources
# compile exactly as in the CPU build (as in custom_ops/build_defs.bzl).
$(BUILD_DIR)/obj/%_gpu.o: CXXFLAGS += -DGOOGLE_CUDA=1
endif

DIST ?= dist

.PHONY: all ops wheel clean
all: ops
ops: $(LIB)

# The wheel (dist/sparse_attention_tf-<version>-<python>-<platform>.whl) of this build.
wheel: $(LIB)
	PYTHON=$(PYTHON) bash scripts/build_pip_pkg.sh --so $(LIB) $(DIST)

# Which TensorFlow $(PYTHON) imports: its folder, distribution and version, read
# without importing it (fast, on every run). build/tf.key changes with it.
TF_KEY := $(shell $(PYTHON) -c 'import importlib.metadata as m, importlib.util as u; \
  d = m.packages_distributions()["tensorflow"][0]; \
  print(u.find_spec("tensorflow").submodule_search_locations[0], d, m.version(d))' 2>/dev/null)

# TF_CFLAGS / TF_LFLAGS / TF_VERSION, regenerated when the TensorFlow of $(PYTHON)
# or this file changes.
$(BUILD_DIR)/tf_flags.mk: Makefile $(BUILD_DIR)/tf.key
	@mkdir -p $(BUILD_DIR)
	@TF_CPP_MIN_LOG_LEVEL=3 $(PYTHON) -c 'import tensorflow as tf; \
	c = tf.sysconfig.get_compile_flags(); \
	print("TF_CFLAGS := " + " ".join("-isystem " + f[2:] if f.startswith("-I") else f for f in c)); \
	print("TF_LFLAGS := " + " ".join(tf.sysconfig.get_link_flags())); \
	print("TF_VERSION := " + tf.__version__)' > $@.tmp 2>/dev/null \
	  || { echo "make: could not query tf.sysconfig with $(PYTHON)" >&2; rm -f $@.tmp; exit 1; }
	@mv $@.tmp $@

# The TensorFlow version recorded in the library (custom_ops/cc/build_info.cc).
$(BUILD_DIR)/gen/custom_ops/tf_version.h: $(BUILD_DIR)/tf_flags.mk
	@mkdir -p $(dir $@)
	@echo '#define SPARSE_ATTENTION_TF_VERSION "$(TF_VERSION)"' > $@
$(BUILD_DIR)/obj/custom_ops/cc/build_info.o: $(BUILD_DIR)/gen/custom_ops/tf_version.h
$(BUILD_DIR)/obj/custom_ops/cc/build_info.o: CXXFLAGS += -iquote $(BUILD_DIR)/gen

ifeq ($(filter clean,$(MAKECMDGOALS)),)
$(shell mkdir -p $(BUILD_DIR); echo '$(TF_KEY)' | cmp -s - $(BUILD_DIR)/tf.key \
  || echo '$(TF_KEY)' > $(BUILD_DIR)/tf.key)
include $(BUILD_DIR)/tf_flags.mk
# Relink when the source list changes (e.g. a file was removed).
$(shell mkdir -p $(BUILD_DIR); echo '$(SRCS)' | cmp -s - $(BUILD_DIR)/srcs.list || echo '$(SRCS)' > $(BUILD_DIR)/srcs.list)
endif

# The AMX engine's translation unit alone gets the AMX instructions (its
# AVX-512 code is in `#pragma GCC target` regions, as every other engine's):
# same as SPARSE_ATTENTION_AMX_COPTS in custom_ops/build_defs.bzl.
$(BUILD_DIR)/obj/custom_ops/cc/kernels/engine_amx.o: CXXFLAGS += -mamx-tile -mamx-bf16

$(BUILD_DIR)/obj/%.o: %.cc $(HDRS) $(HDRS_GPU) $(BUILD_DIR)/tf_flags.mk
	@mkdir -p $(dir $@)
	$(CXX) $(CXXFLAGS) $(TF_CFLAGS) -I. -c $< -o $@

$(LIB): $(OBJS) $(OBJS_GPU) $(BUILD_DIR)/tf_flags.mk $(BUILD_DIR)/srcs.list
	$(CXX) $(LDFLAGS) -o $@ $(OBJS) $(OBJS_GPU) $(TF_LFLAGS) $(LIBS_GPU)

$(BUILD_DIR)/obj/%.cu.o: %.cu $(HDRS_GPU)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVCCFLAGS) -c $< -o $@

clean:
	rm -rf $(BUILD_DIR)
