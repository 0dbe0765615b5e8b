# The heap profiler of the emulated board's image (tools/board/image.py builds it in with USER_C_MODULES).
HEAPPROF_MOD_DIR := $(USERMOD_DIR)
SRC_USERMOD_C += $(HEAPPROF_MOD_DIR)/heapprof.c
