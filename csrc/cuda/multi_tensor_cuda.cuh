// The multi-tensor machinery of the CUDA kernels that cover many tensors in
// one call (sam_step_cuda.cu, mask_scoring_cuda.cu), apex style.
//
// The host cuts each tensor into fixed chunks of kChunkSize elements and
// writes a table of (tensor, chunk start) entries plus one TensorMeta
// (pointers, sizes, mask kind) per tensor; that table goes to the device in
// one non-blocking copy from pinned memory on the current stream, and one
// kernel launch per (dtype, variant) group processes every chunk, one block
// per chunk. Inside a chunk each thread owns the packs threadIdx.x + k *
// kThreads (16-byte vector loads when every pointer of the tensor is
// aligned, the same packs element by element otherwise) and loads kIlp
// packs of every stream before computing on any.
//
// Reductions are deterministic two-stage sums without atomics: one partial
// per chunk in a fixed order (per thread in pack order, then a fixed shuffle
// tree), then the partials added in double in a fixed order. The
// sum-of-squares kernels here serve sam_grad_sq_norm and mask_grad_sq_norm.
//
// Everything sits in an anonymous namespace: each .cu file that includes
// this gets its own internal copy (no cross-file device linking needed).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

namespace sparsesam::cuda {
namespace {

constexpr int kThreads = 256;
// Elements per chunk (= per block). A multiple of every pack width and
// 16384 * sizeof(T) bytes, so a chunk starts as aligned as its tensor.
// Fixed, so the norm's summation order never depends on the device.
constexpr int64_t kChunkSize = 16384;
constexpr int kSumThreads = 512;
constexpr int kVectorBytes = 16;
// gridDim.x limit: a (hypothetical) larger table goes in several launches.
constexpr int64_t kMaxChunksPerLaunch = std::numeric_limits<int32_t>::max();

// The element type of a mask or rho tensor, read at run time: a mask's kind
// is uniform over a block, so the branch costs next to nothing, and the
// kernels need not be instantiated once per mask dtype.
enum Kind : int32_t { kNone = 0, kBool, kHalf, kBFloat16, kFloat, kDouble };

// One tensor of a call. The mask-scoring ops use param for the weight (null
// where grads[i] is dM itself), mask for their mask or scores operand, and
// out for what they write.
struct TensorMeta {
  void* param;         // sam_grad_sq_norm: the weight (adaptive only); sam_perturb_: read; sgd_step_: updated
  const void* grad;
  void* out;           // sam_perturb_: the ascent point
  void* buf;           // sgd_step_: the momentum buffer (null without momentum)
  const void* mask;    // null: a dense parameter
  const void* rho;     // sam_perturb_: device rho; null when rho_value holds it
  int64_t numel;
  int64_t channel_size;  // per-channel rho: elements per output channel; 0: one rho for the tensor
  double rho_value;
  uint32_t channel_magic;  // division by channel_size as multiply + shift; 0: use a 64-bit division
  int32_t channel_shift;
  int32_t mask_kind;
  int32_t mask_bytes;
  int32_t rho_kind;
  int32_t aligned;  // every pointer admits the vector loads of this dtype
};

struct Chunk {
  int64_t tensor;
  int64_t start;
};

// ---------------------------------------------------------------------------
// Device helpers

template <typename T, int N>
struct alignas(sizeof(T) * N < kVectorBytes ? sizeof(T) * N : kVectorBytes) Pack {
  T v[N];
};

template <typename scalar_t>
constexpr int pack_width() {
  return kVectorBytes / static_cast<int>(sizeof(scalar_t));
}

// Packs of every stream a thread loads before it computes on any: 16
// elements of a 16-bit type, 16 floats, 8 doubles — enough bytes in flight
// without the registers that would cost occupancy.
template <typename scalar_t>
constexpr int ilp() {
  return sizeof(scalar_t) == 2 ? 2 : 4;
}

// Pack `p` of a chunk: one vector access when aligned, else N scalar ones
// (same elements, same order: only the width of the access changes).
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* base, int p, bool aligned) {
  if (aligned) return reinterpret_cast<const Pack<T, N>*>(base)[p];
  Pack<T, N> r;
#pragma unroll
  for (int j = 0; j < N; ++j) r.v[j] = base[p * N + j];
  return r;
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* base, int p, const Pack<T, N>& v, bool aligned) {
  if (aligned) {
    reinterpret_cast<Pack<T, N>*>(base)[p] = v;
    return;
  }
#pragma unroll
  for (int j = 0; j < N; ++j) base[p * N + j] = v.v[j];
}

__device__ __forceinline__ bool nonzero(uint8_t v) { return v != 0; }
template <typename T>
__device__ __forceinline__ bool nonzero(T v) {
  return static_cast<at::opmath_type<T>>(v) != 0;  // NaN counts as kept, as `mask != 0` does
}

template <int N, typename mask_t>
__device__ __forceinline__ uint32_t keep_bits_as(const void* m, int p, bool aligned) {
  const auto v = load_pack<N>(static_cast<const mask_t*>(m), p, aligned);
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j < N; ++j) bits |= static_cast<uint32_t>(nonzero(v.v[j])) << j;
  return bits;
}

// Bit j: whether element p*N+j of the chunk is kept (not pruned). One
// register per pack rather than N predicates.
template <int N>
__device__ __forceinline__ uint32_t keep_bits(int32_t kind, const void* m, int p, bool aligned) {
  switch (kind) {
    case kBool: return keep_bits_as<N, uint8_t>(m, p, aligned);
    case kHalf: return keep_bits_as<N, at::Half>(m, p, aligned);
    case kBFloat16: return keep_bits_as<N, at::BFloat16>(m, p, aligned);
    case kFloat: return keep_bits_as<N, float>(m, p, aligned);
    case kDouble: return keep_bits_as<N, double>(m, p, aligned);
    default: return (1u << N) - 1u;
  }
}

__device__ __forceinline__ bool kept(uint32_t bits, int j) { return (bits >> j) & 1u; }

__device__ __forceinline__ bool keep_one(int32_t kind, const void* m, int i) {
  return keep_bits<1>(kind, m, i, true) != 0;
}

__device__ __forceinline__ double load_double(int32_t kind, const void* p, int64_t i) {
  switch (kind) {
    case kHalf: return static_cast<double>(static_cast<const at::Half*>(p)[i]);
    case kBFloat16: return static_cast<double>(static_cast<const at::BFloat16*>(p)[i]);
    case kFloat: return static_cast<double>(static_cast<const float*>(p)[i]);
    default: return static_cast<const double*>(p)[i];
  }
}

// Correctly rounded, never contracted into an FMA with a neighbour.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

__device__ __forceinline__ int chunk_length(const TensorMeta& t, const Chunk& c) {
  const int64_t left = t.numel - c.start;
  return static_cast<int>(left < kChunkSize ? left : kChunkSize);
}

__device__ __forceinline__ const void* chunk_mask(const TensorMeta& t, const Chunk& c) {
  return t.mask == nullptr ? nullptr : static_cast<const char*>(t.mask) + c.start * t.mask_bytes;
}

// Sum over the block in a fixed order: a shuffle tree in each warp, then the
// warp sums by the same tree in the first warp. The result is in thread 0.
template <int kBlock, typename T>
__device__ __forceinline__ T block_sum(T v) {
  static_assert(kBlock % 32 == 0 && kBlock <= 1024, "whole warps, one block");
  constexpr int kWarps = kBlock / 32;
  __shared__ T warp_sums[kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : T(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

// ---------------------------------------------------------------------------
// sam_grad_sq_norm

// sum + (s g)^2 at a kept entry (a pruned inf/nan does not leak in). Every
// operation is an explicitly rounded one, so no compiler or GPU may fuse or
// reorder it differently: the bits are fixed by the source.
template <bool kAdaptive, typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> add_sq_term(at::opmath_type<scalar_t> sum, scalar_t g,
                                                                 scalar_t w, bool keep) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t x = static_cast<acc_t>(g);
  if constexpr (kAdaptive) x = mul_rn(x, static_cast<acc_t>(w));  // (|w| g)^2 = (w g)^2
  return keep ? fma_rn(x, x, sum) : sum;
}

// partials[c] = sum over chunk c of (s g)^2 at kept entries.
template <typename scalar_t, bool kAdaptive>
__global__ void __launch_bounds__(kThreads)
    sq_norm_partials_kernel(const TensorMeta* __restrict__ metas, const Chunk* __restrict__ chunks,
                            double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int N = pack_width<scalar_t>();
  constexpr int kIlp = ilp<scalar_t>();
  const Chunk chunk = chunks[blockIdx.x];
  const TensorMeta& t = metas[chunk.tensor];
  const int len = chunk_length(t, chunk);
  const bool aligned = t.aligned != 0;
  const int32_t mask_kind = t.mask_kind;
  const scalar_t* g = static_cast<const scalar_t*>(t.grad) + chunk.start;
  const scalar_t* w = kAdaptive ? static_cast<const scalar_t*>(t.param) + chunk.start : nullptr;
  const void* m = chunk_mask(t, chunk);

  acc_t sum = 0;
  const int n_packs = len / N;
  for (int base = threadIdx.x; base < n_packs; base += kThreads * kIlp) {
    Pack<scalar_t, N> gv[kIlp];
    Pack<scalar_t, N> wv[kIlp];
    uint32_t keep[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int p = base + k * kThreads;
      if (p < n_packs) {
        gv[k] = load_pack<N>(g, p, aligned);
        if constexpr (kAdaptive) wv[k] = load_pack<N>(w, p, aligned);
        keep[k] = keep_bits<N>(mask_kind, m, p, aligned);
      }
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      if (base + k * kThreads < n_packs) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          if constexpr (kAdaptive) {
            sum = add_sq_term<true>(sum, gv[k].v[j], wv[k].v[j], kept(keep[k], j));
          } else {
            sum = add_sq_term<false>(sum, gv[k].v[j], gv[k].v[j], kept(keep[k], j));
          }
        }
      }
    }
  }
  // The < N elements after the last whole pack.
  for (int i = n_packs * N + threadIdx.x; i < len; i += kThreads) {
    sum = add_sq_term<kAdaptive>(sum, g[i], kAdaptive ? w[i] : g[i], keep_one(mask_kind, m, i));
  }
  sum = block_sum<kThreads>(sum);
  if (threadIdx.x == 0) partials[blockIdx.x] = static_cast<double>(sum);
}

// *out = the partials summed in double, in a fixed order.
__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(const double* __restrict__ partials, int64_t n, double* __restrict__ out) {
  double sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += kSumThreads) sum += partials[i];
  sum = block_sum<kSumThreads>(sum);
  if (threadIdx.x == 0) *out = sum;
}

// ---------------------------------------------------------------------------
// Host: validation, the chunk table, launches

struct Group {
  at::ScalarType dtype;
  int variant;  // an op's own kernel choice (e.g. whether a weight scales the norm); 0 if it has none
  int64_t first_chunk;
  int64_t num_chunks;
};

// The chunk table of one call: TensorMeta per tensor, chunks grouped by
// (dtype, variant) (one launch per group), uploaded once.
class MultiTensorTable {
 public:
  void add(TensorMeta meta, at::ScalarType dtype, int variant = 0) {
    const int64_t elem = static_cast<int64_t>(c10::elementSize(dtype));
    const int64_t n = kVectorBytes / elem;
    meta.aligned = aligned(meta.param, elem * n) && aligned(meta.grad, elem * n) && aligned(meta.out, elem * n) &&
                   aligned(meta.buf, elem * n) && aligned(meta.mask, meta.mask_bytes * n);
    metas_.push_back(meta);
    keys_.push_back({dtype, variant});
  }

  // Tensors that must live until the launches are enqueued (contiguous
  // copies of inputs); the caching allocator orders their reuse after them.
  void keep_alive(const at::Tensor& t) { keep_alive_.push_back(t); }

  // Lays out the chunks and copies the table to `device` on the current
  // stream, asynchronously (the pinned buffer is recycled only after it).
  void upload(const at::Device& device) {
    std::vector<std::pair<at::ScalarType, int>> order;  // groups in order of first appearance
    for (const auto& key : keys_) {
      if (std::find(order.begin(), order.end(), key) == order.end()) order.push_back(key);
    }
    for (const auto& key : order) {
      Group group{key.first, key.second, static_cast<int64_t>(chunks_.size()), 0};
      for (size_t i = 0; i < metas_.size(); ++i) {
        if (keys_[i] != key) continue;
        first_chunk_.resize(metas_.size(), 0);
        first_chunk_[i] = static_cast<int64_t>(chunks_.size());
        for (int64_t start = 0; start < metas_[i].numel; start += kChunkSize) {
          chunks_.push_back(Chunk{static_cast<int64_t>(i), start});
        }
      }
      group.num_chunks = static_cast<int64_t>(chunks_.size()) - group.first_chunk;
      if (group.num_chunks > 0) groups_.push_back(group);
    }
    if (chunks_.empty()) return;
    const size_t meta_bytes = metas_.size() * sizeof(TensorMeta);
    const size_t chunk_bytes = chunks_.size() * sizeof(Chunk);
    at::Tensor host = at::empty({static_cast<int64_t>(meta_bytes + chunk_bytes)},
                                at::TensorOptions().dtype(at::kByte).pinned_memory(true));
    auto* bytes = static_cast<char*>(host.mutable_data_ptr());
    std::memcpy(bytes, metas_.data(), meta_bytes);
    std::memcpy(bytes + meta_bytes, chunks_.data(), chunk_bytes);
    device_ = host.to(device, at::kByte, /*non_blocking=*/true);
    meta_bytes_ = meta_bytes;
  }

  int64_t num_chunks() const { return static_cast<int64_t>(chunks_.size()); }
  // After upload: tensor i (in the order of add) owns the chunks
  // [first_chunk(i), first_chunk(i) + ceil(numel / kChunkSize)).
  int64_t first_chunk(size_t i) const { return first_chunk_[i]; }
  const std::vector<Group>& groups() const { return groups_; }
  const TensorMeta* device_metas() const { return static_cast<const TensorMeta*>(device_.const_data_ptr()); }
  const Chunk* device_chunks() const {
    return reinterpret_cast<const Chunk*>(static_cast<const char*>(device_.const_data_ptr()) + meta_bytes_);
  }

 private:
  static bool aligned(const void* p, int64_t bytes) {
    const int64_t align = std::min<int64_t>(bytes, kVectorBytes);
    return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % static_cast<std::uintptr_t>(align) == 0;
  }

  std::vector<TensorMeta> metas_;
  std::vector<std::pair<at::ScalarType, int>> keys_;  // (dtype, variant) per tensor
  std::vector<int64_t> first_chunk_;
  std::vector<Chunk> chunks_;
  std::vector<Group> groups_;
  std::vector<at::Tensor> keep_alive_;
  at::Tensor device_;
  size_t meta_bytes_ = 0;
};

// Calls launch(first_chunk, count) for a group, in grid-sized pieces.
template <typename F>
void for_each_launch(const Group& group, F&& launch) {
  for (int64_t begin = 0; begin < group.num_chunks; begin += kMaxChunksPerLaunch) {
    const int64_t count = std::min(kMaxChunksPerLaunch, group.num_chunks - begin);
    launch(group.first_chunk + begin, static_cast<unsigned int>(count));
  }
}

template <typename F>
void dispatch_bool(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

int32_t kind_of(at::ScalarType t) {
  switch (t) {
    case at::kBool: return kBool;
    case at::kHalf: return kHalf;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat;
    case at::kDouble: return kDouble;
    default: return kNone;
  }
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Same layout: equal sizes and equal strides wherever a dimension has more
// than one element (a flat index then means the same element in both).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

// `t` (read only) in the memory layout of `ref` (non-overlapping and
// dense): itself when they agree, else a copy (kept alive by the table).
at::Tensor laid_out_like(const at::Tensor& t, const at::Tensor& ref, MultiTensorTable& table) {
  if (same_layout(t, ref)) return t;
  at::Tensor copy = at::empty_like(ref, t.options(), at::MemoryFormat::Preserve);
  copy.copy_(t);
  table.keep_alive(copy);
  return copy;
}

// A read-only tensor that sets the layout of its group: itself when dense, else contiguous.
at::Tensor dense(const at::Tensor& t, MultiTensorTable& table) {
  if (t.is_non_overlapping_and_dense()) return t;
  at::Tensor copy = t.contiguous();
  table.keep_alive(copy);
  return copy;
}

void check_lengths(const char* op, const char* ref_name, size_t n,
                   std::initializer_list<std::pair<const char*, size_t>> others) {
  for (const auto& [name, size] : others) {
    TORCH_CHECK(size == n, op, ": ", name, " has ", size, " tensors but ", ref_name, " has ", n);
  }
}

void check_param(const char* op, const char* name, size_t i, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), " but ", name, "[0] is on ",
              device, " (one call covers one CUDA device)");
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, "[", i,
              "] must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

void check_like(const char* op, const char* name, size_t i, const at::Tensor& t, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, "[", i, "] is on ", t.device(), " but ", ref_name, "[",
              i, "] is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
              " but ", ref_name, "[", i, "] has ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(), " but ", ref_name, "[",
              i, "] has ", ref.sizes());
}

// A tensor the op writes: it must be addressable as one flat array.
void check_writable(const char* op, const char* name, size_t i, const at::Tensor& t) {
  TORCH_CHECK(t.numel() == 0 || t.is_non_overlapping_and_dense(), op, ": ", name, "[", i,
              "] is written in place and must be non-overlapping and dense (e.g. contiguous)");
}

void set_mask(const char* op, size_t i, const std::optional<at::Tensor>& mask, const at::Tensor& ref,
              TensorMeta& meta, MultiTensorTable& table) {
  if (!mask.has_value() || !mask->defined()) return;
  TORCH_CHECK(mask->device() == ref.device(), op, ": masks[", i, "] is on ", mask->device(),
              " but its parameter is on ", ref.device());
  TORCH_CHECK(mask->sizes() == ref.sizes(), op, ": masks[", i, "] has shape ", mask->sizes(),
              " but its parameter has ", ref.sizes());
  const int32_t kind = kind_of(mask->scalar_type());
  TORCH_CHECK(kind != kNone, op, ": masks[", i, "] must be bool or floating, got ", mask->scalar_type());
  if (ref.numel() == 0) return;
  const at::Tensor m = laid_out_like(*mask, ref, table);
  meta.mask = m.const_data_ptr();
  meta.mask_kind = kind;
  meta.mask_bytes = static_cast<int32_t>(c10::elementSize(mask->scalar_type()));
}

// Sum over a filled, uploaded table of (s g)^2 at kept entries, s = w in
// groups of variant 1 (TensorMeta::param holds the weight), else 1: a
// float64 0-d tensor on `device`.
at::Tensor sum_of_squares(const MultiTensorTable& table, const at::Device& device) {
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(at::kDouble).device(device));
  if (table.num_chunks() == 0) return out.zero_();
  at::Tensor partials = at::empty({table.num_chunks()}, at::TensorOptions().dtype(at::kDouble).device(device));
  double* partials_ptr = partials.mutable_data_ptr<double>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const Group& group : table.groups()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, group.dtype, "sum_of_squares_cuda", [&] {
      dispatch_bool(group.variant != 0, [&](auto scaled_t) {
        for_each_launch(group, [&](int64_t first, unsigned int count) {
          sq_norm_partials_kernel<scalar_t, decltype(scaled_t)::value><<<count, kThreads, 0, stream>>>(
              table.device_metas(), table.device_chunks() + first, partials_ptr + first);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    });
  }
  sum_partials_kernel<<<1, kSumThreads, 0, stream>>>(partials_ptr, table.num_chunks(), out.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace sparsesam::cuda
