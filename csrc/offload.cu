// Native copy engine and host-memory helpers for the offload LayerStreamer.
//
// A plain C ABI (loaded with ctypes from specexec_rt/offload/native.py), so the library does not depend
// on PyTorch's C++ ABI and builds with nvcc alone. cudart is linked statically: the process may
// then hold two runtime instances (ours and PyTorch's), which is fine because both use the
// device's primary context, and streams/events are driver objects shared by both.
//
// Every function returns a cudaError_t (0 = success); sx_error_string() turns it into text.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "offload.h"

#define SX_CHECK(expr)                         \
  do {                                         \
    cudaError_t sx_err__ = (expr);             \
    if (sx_err__ != cudaSuccess) {             \
      return static_cast<int>(sx_err__);       \
    }                                          \
  } while (0)

extern "C" {

int sx_abi_version(void) { return SX_ABI_VERSION; }

const char* sx_error_string(int code) {
  return cudaGetErrorString(static_cast<cudaError_t>(code));
}

int sx_device_count(int* out) { return static_cast<int>(cudaGetDeviceCount(out)); }

// Page-locked host memory of exactly `bytes` (cudaHostAlloc does not round up to a power of
// two the way PyTorch's caching host allocator does). Portable: pinned for every device.
int sx_host_alloc(size_t bytes, void** out) {
  *out = nullptr;
  if (bytes == 0) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaHostAlloc(out, bytes, cudaHostAllocPortable));
}

int sx_host_free(void* ptr) { return static_cast<int>(cudaFreeHost(ptr)); }

// Page-lock memory the caller already owns (e.g. a torch CPU tensor), at its exact size.
int sx_host_register(void* ptr, size_t bytes) {
  if (ptr == nullptr || bytes == 0) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaHostRegister(ptr, bytes, cudaHostRegisterPortable));
}

int sx_host_unregister(void* ptr) { return static_cast<int>(cudaHostUnregister(ptr)); }

// *out = 1 when `ptr` is page-locked host memory known to CUDA (allocated or registered).
int sx_is_pinned(const void* ptr, int* out) {
  *out = 0;
  cudaPointerAttributes attr;
  cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
  if (err == cudaErrorInvalidValue) {  // unknown pageable pointer on old drivers
    cudaGetLastError();
    return 0;
  }
  SX_CHECK(err);
  *out = attr.type == cudaMemoryTypeHost ? 1 : 0;
  return 0;
}

// Asynchronous copies of a byte range on the caller's stream (a cudaStream_t, e.g.
// torch.cuda.Stream.cuda_stream) of device `device`. The host side must be pinned for the copy to be truly
// asynchronous; the caller orders the stream with events.
int sx_memcpy_h2d_async(int device, void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes == 0) return 0;
  SX_CHECK(cudaSetDevice(device));  // our runtime's current device is not PyTorch's
  return static_cast<int>(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, static_cast<cudaStream_t>(stream)));
}

int sx_memcpy_d2h_async(int device, void* dst, const void* src, size_t bytes, void* stream) {
  if (bytes == 0) return 0;
  SX_CHECK(cudaSetDevice(device));
  return static_cast<int>(
      cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, static_cast<cudaStream_t>(stream)));
}

// Bandwidth probe: `iters` timed copies of `bytes` (after one warm-up copy) between device
// `device` and host memory of kind `host_kind` (SX_HOST_PAGEABLE / _PINNED / _REGISTERED), in
// direction `direction` (SX_H2D / SX_D2H). Each copy is timed with a pair of CUDA events on a
// private stream; out_ms[i] receives copy i's time in milliseconds. Everything allocated here
// is freed before returning, on success and on error.
int sx_probe_bandwidth(int device, size_t bytes, int host_kind, int direction, int iters,
                       float* out_ms) {
  if (bytes == 0 || iters <= 0 || out_ms == nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (host_kind < SX_HOST_PAGEABLE || host_kind > SX_HOST_REGISTERED) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  if (direction != SX_H2D && direction != SX_D2H) return static_cast<int>(cudaErrorInvalidValue);
  SX_CHECK(cudaSetDevice(device));

  void* host = nullptr;
  void* dev = nullptr;
  cudaStream_t stream = nullptr;
  cudaEvent_t start = nullptr, stop = nullptr;
  bool registered = false;
  cudaError_t err = cudaSuccess;

  if (host_kind == SX_HOST_PINNED) {
    err = cudaHostAlloc(&host, bytes, cudaHostAllocPortable);
  } else {
    host = std::malloc(bytes);
    if (host == nullptr) err = cudaErrorMemoryAllocation;
    if (err == cudaSuccess) std::memset(host, 1, bytes);  // fault the pages in before timing
    if (err == cudaSuccess && host_kind == SX_HOST_REGISTERED) {
      err = cudaHostRegister(host, bytes, cudaHostRegisterPortable);
      registered = err == cudaSuccess;
    }
  }
  if (err == cudaSuccess) err = cudaMalloc(&dev, bytes);
  if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  if (err == cudaSuccess) err = cudaEventCreate(&start);
  if (err == cudaSuccess) err = cudaEventCreate(&stop);

  const cudaMemcpyKind kind = direction == SX_H2D ? cudaMemcpyHostToDevice : cudaMemcpyDeviceToHost;
  void* dst = direction == SX_H2D ? dev : host;
  const void* src = direction == SX_H2D ? host : dev;
  if (err == cudaSuccess) err = cudaMemcpyAsync(dst, src, bytes, kind, stream);  // warm-up
  if (err == cudaSuccess) err = cudaStreamSynchronize(stream);
  for (int i = 0; i < iters && err == cudaSuccess; ++i) {
    err = cudaEventRecord(start, stream);
    if (err == cudaSuccess) err = cudaMemcpyAsync(dst, src, bytes, kind, stream);
    if (err == cudaSuccess) err = cudaEventRecord(stop, stream);
    if (err == cudaSuccess) err = cudaEventSynchronize(stop);
    if (err == cudaSuccess) err = cudaEventElapsedTime(&out_ms[i], start, stop);
  }

  // Release in reverse order; keep the first error.
  auto keep = [&err](cudaError_t e) {
    if (err == cudaSuccess && e != cudaSuccess) err = e;
  };
  if (stop != nullptr) keep(cudaEventDestroy(stop));
  if (start != nullptr) keep(cudaEventDestroy(start));
  if (stream != nullptr) keep(cudaStreamDestroy(stream));
  if (dev != nullptr) keep(cudaFree(dev));
  if (host_kind == SX_HOST_PINNED) {
    if (host != nullptr) keep(cudaFreeHost(host));
  } else {
    if (registered) keep(cudaHostUnregister(host));
    std::free(host);
  }
  return static_cast<int>(err);
}

}  // extern "C"
