// C ABI of libspecexec_offload (see offload.cu). Mirrored by the ctypes prototypes in
// specexec_rt/offload/native.py: bump SX_ABI_VERSION whenever a signature changes.
#pragma once

#include <stddef.h>

#define SX_ABI_VERSION 2

#define SX_HOST_PAGEABLE 0
#define SX_HOST_PINNED 1
#define SX_HOST_REGISTERED 2

#define SX_H2D 0
#define SX_D2H 1

#ifdef __cplusplus
extern "C" {
#endif

int sx_abi_version(void);
const char* sx_error_string(int code);
int sx_device_count(int* out);
int sx_host_alloc(size_t bytes, void** out);
int sx_host_free(void* ptr);
int sx_host_register(void* ptr, size_t bytes);
int sx_host_unregister(void* ptr);
int sx_is_pinned(const void* ptr, int* out);
int sx_memcpy_h2d_async(int device, void* dst, const void* src, size_t bytes, void* stream);
int sx_memcpy_d2h_async(int device, void* dst, const void* src, size_t bytes, void* stream);
int sx_probe_bandwidth(int device, size_t bytes, int host_kind, int direction, int iters,
                       float* out_ms);

#ifdef __cplusplus
}
#endif
