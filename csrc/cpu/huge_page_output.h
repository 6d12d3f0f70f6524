// Large CPU op outputs backed by transparent huge pages where the kernel
// allows them (Linux THP in "madvise" or "always" mode).
//
// Why: a fresh output of tens of MiB (sparse_conv2d's y and dx: B=128,
// 64 channels, 32x32 is 32 MiB each) is above glibc's largest mmap
// threshold, so every call maps new pages and faults each 4 KiB page in on
// first touch. Measured (ResNet-style layer, 99% sparse, one thread,
// getrusage): 16,386 minor faults per forward+backward, 45-50 ms of system
// time against 54-67 ms of user time, i.e. page faults were ~45% of the op.
// With the block 2 MiB-aligned and madvise(MADV_HUGEPAGE) the same memory
// faults in as 2 MiB pages: ~1,000 faults, ~7 ms of system time.
//
// Nothing process-wide changes: only these allocations are advised, they
// are freed as usual (no cache keeps them), and where THP is off the advice
// is a no-op. (PyTorch's own THP_MEM_ALLOC_ENABLE=1 does the same for every
// allocation of the process, the dense baselines included; the library does
// not set it.) SPARSESAM_NO_HUGE_PAGES=1 turns this off (read once).
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sparsesam::cpu {

class HugePageOutputAllocator final : public c10::Allocator {
 public:
  // Below this, the default allocator (glibc reuses such blocks, and a huge
  // page would round up a lot).
  static constexpr size_t kMinBytes = size_t(8) << 20;
  static constexpr size_t kHugePage = size_t(2) << 20;

  c10::DataPtr allocate(size_t n) override {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (n >= kMinBytes && enabled()) {
      const size_t bytes = (n + kHugePage - 1) / kHugePage * kHugePage;
      void* p = nullptr;
      if (posix_memalign(&p, kHugePage, bytes) == 0) {
        madvise(p, bytes, MADV_HUGEPAGE);  // advice only: an error leaves 4 KiB pages
        return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
      }
    }
#endif
    return c10::GetCPUAllocator()->allocate(n);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* p) { std::free(p); }
  static bool enabled() {
    static const bool on = [] {
      const char* off = std::getenv("SPARSESAM_NO_HUGE_PAGES");
      return off == nullptr || off[0] == '\0' || off[0] == '0';
    }();
    return on;
  }
};

// at::empty(sizes, options) for a contiguous CPU output, from the allocator above.
inline at::Tensor empty_output_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static HugePageOutputAllocator allocator;
  return at::Tensor(at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                              c10::typeMetaToScalarType(options.dtype()),
                                              c10::MemoryFormat::Contiguous));
}

}  // namespace sparsesam::cpu
