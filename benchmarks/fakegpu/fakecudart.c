/* A stand-in for the CUDA runtime on a machine without a GPU, loaded with LD_PRELOAD in front of the CUDA build
 * of torch (see benchmarks/dryrun.py, which builds and loads it). It answers the queries torch makes before any
 * kernel runs -- how many devices, which one is current, what they are -- with FAKE_CUDA_DEVICES (default 8)
 * Hopper-class 80 GB devices. It defines no allocation, copy or launch: under FakeTensorMode none is made,
 * and a real one still fails, as it must on a machine with no GPU.
 *
 * Build: gcc -shared -fPIC -O2 -I <triton>/backends/nvidia/include -o libfakecudart.so fakecudart.c
 * (the CUDA headers ship inside the triton wheel that the CUDA build of torch depends on).
 */
#include <stdlib.h>
#include <string.h>
#include <cuda_runtime_api.h>

#define FAKE_SMS 132
#define FAKE_MEMORY (80ull << 30)

static int current_device = 0;

static int device_count(void) {
  const char *value = getenv("FAKE_CUDA_DEVICES");
  int n = value ? atoi(value) : 8;
  return n > 0 ? n : 1;
}

cudaError_t cudaGetDeviceCount(int *count) { *count = device_count(); return cudaSuccess; }

cudaError_t cudaGetDevice(int *device) { *device = current_device; return cudaSuccess; }

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= device_count()) return cudaErrorInvalidDevice;
  current_device = device;
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int *version) { *version = 13000; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int *version) { *version = 13000; return cudaSuccess; }

cudaError_t cudaDeviceGetStreamPriorityRange(int *least, int *greatest) {
  if (least) *least = 0;
  if (greatest) *greatest = -5;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus *status) {
  (void)stream;
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

static void fill_properties(struct cudaDeviceProp *prop) {
  memset(prop, 0, sizeof(*prop));
  strncpy(prop->name, "fake sm_90 80GB", sizeof(prop->name) - 1);
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = FAKE_SMS;
  prop->totalGlobalMem = FAKE_MEMORY;
  prop->warpSize = 32;
  prop->maxThreadsPerBlock = 1024;
  prop->maxThreadsPerMultiProcessor = 2048;
  prop->maxThreadsDim[0] = 1024;
  prop->maxThreadsDim[1] = 1024;
  prop->maxThreadsDim[2] = 64;
  prop->maxGridSize[0] = 0x7fffffff;
  prop->maxGridSize[1] = 65535;
  prop->maxGridSize[2] = 65535;
  prop->sharedMemPerBlock = 48 << 10;
  prop->sharedMemPerBlockOptin = 227 << 10;
  prop->sharedMemPerMultiprocessor = 228 << 10;
  prop->regsPerBlock = 65536;
  prop->regsPerMultiprocessor = 65536;
  prop->l2CacheSize = 50 << 20;
  prop->memoryBusWidth = 5120;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *prop, int device) {
  if (device < 0 || device >= device_count()) return cudaErrorInvalidDevice;
  fill_properties(prop);
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties_v2(struct cudaDeviceProp *prop, int device) {
  return cudaGetDeviceProperties(prop, device);
}

cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device) {
  (void)device;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMultiProcessorCount: *value = FAKE_SMS; break;
    case cudaDevAttrWarpSize: *value = 32; break;
    case cudaDevAttrMaxThreadsPerBlock: *value = 1024; break;
    default: *value = 0;
  }
  return cudaSuccess;
}

/* Driver API: torch's lazy NVRTC/driver lookup asks whether a primary context exists; there is none. */
int cuDevicePrimaryCtxGetState(int device, unsigned int *flags, int *active) {
  (void)device;
  *flags = 0;
  *active = 0;
  return 0;
}

/* Streams and events: opaque non-null handles, every operation complete at once (nothing ever runs). */
static char handles[4096];
static int next_handle = 0;

static void *new_handle(void) { return &handles[(next_handle++) % (int)sizeof(handles)]; }

cudaError_t cudaStreamCreate(cudaStream_t *stream) { *stream = (cudaStream_t)new_handle(); return cudaSuccess; }
cudaError_t cudaStreamCreateWithFlags(cudaStream_t *stream, unsigned int flags) {
  (void)flags;
  return cudaStreamCreate(stream);
}
cudaError_t cudaStreamCreateWithPriority(cudaStream_t *stream, unsigned int flags, int priority) {
  (void)flags;
  (void)priority;
  return cudaStreamCreate(stream);
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) { (void)stream; return cudaSuccess; }
cudaError_t cudaStreamSynchronize(cudaStream_t stream) { (void)stream; return cudaSuccess; }
cudaError_t cudaStreamQuery(cudaStream_t stream) { (void)stream; return cudaSuccess; }
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int flags) {
  (void)stream;
  (void)event;
  (void)flags;
  return cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t *event) { *event = (cudaEvent_t)new_handle(); return cudaSuccess; }
cudaError_t cudaEventCreateWithFlags(cudaEvent_t *event, unsigned int flags) {
  (void)flags;
  return cudaEventCreate(event);
}
cudaError_t cudaEventDestroy(cudaEvent_t event) { (void)event; return cudaSuccess; }
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) { (void)event; (void)stream; return cudaSuccess; }
cudaError_t cudaEventRecordWithFlags(cudaEvent_t event, cudaStream_t stream, unsigned int flags) {
  (void)flags;
  return cudaEventRecord(event, stream);
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) { (void)event; return cudaSuccess; }
cudaError_t cudaEventQuery(cudaEvent_t event) { (void)event; return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float *ms, cudaEvent_t start, cudaEvent_t end) {
  (void)start;
  (void)end;
  *ms = 0.0f;
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) {
  *free_bytes = FAKE_MEMORY;
  *total_bytes = FAKE_MEMORY;
  return cudaSuccess;
}
cudaError_t cudaDeviceCanAccessPeer(int *can, int device, int peer) {
  (void)device;
  (void)peer;
  *can = 0;
  return cudaSuccess;
}
