// Reused memory for large CPU outputs (norm.cpp): freed blocks are kept and handed out again.
//
// Why: a fresh large buffer from malloc is mapped page by page on first write, and on this
// class of machine a 4 KiB page fault (with cgroup memory accounting) costs about as much as
// reading the page ten times: a 16 MiB output faulted in takes longer than the whole
// bandwidth-bound norm kernel that writes it. glibc keeps or returns freed memory by its own
// heuristics, so whether an output faults depends on what ran before. Blocks freed by the
// tensors that own them go back to a free list here (the most recent kMaxCachedBytes; older
// ones go back to the system) and the next output of a similar size takes one without faulting; new blocks are
// 2 MiB aligned and advised as transparent huge pages, so even a first touch costs 1/512 of the
// faults.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstddef>
#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fastattn_cpu {

class BufferPool final : public c10::Allocator {
 public:
  // Requests below this go to torch's CPU allocator (glibc reuses small blocks without faults).
  static constexpr size_t kMinPooledBytes = size_t{1} << 17;
  // Free blocks kept for reuse, in bytes; blocks freed beyond it are returned to the system.
  static constexpr size_t kMaxCachedBytes = size_t{1} << 29;
  static constexpr size_t kHugePage = size_t{1} << 21;

  // The process-wide pool. Never destroyed: tensors may be freed after static destructors ran.
  static BufferPool& get() {
    static BufferPool* pool = new BufferPool();
    return *pool;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinPooledBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t size = block_size(nbytes);
    Block* block = take(size);
    if (block == nullptr) block = new_block(size);
    block->requested = nbytes;
    report(block->data, static_cast<int64_t>(nbytes));
    return {block->data, block, &BufferPool::release, c10::Device(c10::kCPU)};
  }

  // Returns every free block to the system (blocks held by live tensors come back to the pool
  // when those are freed).
  void release_cached() {
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      freed.swap(free_);
      cached_bytes_ = 0;
    }
    for (Block* b : freed) {
      std::free(b->data);
      delete b;
    }
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Block {
    void* data;
    size_t size;
    size_t requested = 0;  // bytes of the tensor it holds now
  };

  // Tells torch's profiler (profile_memory=True) about an allocation (+) or a free (-), as
  // torch's own CPU allocator does, so pooled outputs count in its memory statistics.
  void report(void* data, int64_t delta) {
    size_t in_use = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ = static_cast<size_t>(static_cast<int64_t>(in_use_bytes_) + delta);
      in_use = in_use_bytes_;
      reserved = in_use_bytes_ + cached_bytes_;
    }
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(data, delta, in_use, reserved, c10::Device(c10::kCPU));
  }

  // Size classes: powers of two below 2 MiB, multiples of 2 MiB above (at most 1/8 or 2 MiB
  // wasted), so outputs of nearby sizes share blocks.
  static size_t block_size(size_t nbytes) {
    if (nbytes >= kHugePage) return (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    size_t size = kMinPooledBytes;
    while (size < nbytes) size *= 2;
    return size;
  }

  // The most recently freed block of this size: the likeliest to be still in cache.
  Block* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t k = free_.size(); k-- > 0;) {
      if (free_[k]->size == size) {
        Block* block = free_[k];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(k));
        cached_bytes_ -= size;
        return block;
      }
    }
    return nullptr;
  }

  static Block* new_block(size_t size) {
    void* data = nullptr;
    const size_t alignment = size >= kHugePage ? kHugePage : 64;
    if (posix_memalign(&data, alignment, size) != 0) throw std::bad_alloc();
#ifdef __linux__
    if (size >= kHugePage) madvise(data, size, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
    return new Block{data, size};
  }

  // Keeps the freed block; the oldest ones go back to the system beyond kMaxCachedBytes.
  static void release(void* ctx) {
    Block* block = static_cast<Block*>(ctx);
    BufferPool& pool = get();
    pool.report(block->data, -static_cast<int64_t>(block->requested));
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(pool.mutex_);
      pool.free_.push_back(block);
      pool.cached_bytes_ += block->size;
      size_t k = 0;
      while (pool.cached_bytes_ > kMaxCachedBytes) {
        evicted.push_back(pool.free_[k]);
        pool.cached_bytes_ -= pool.free_[k++]->size;
      }
      pool.free_.erase(pool.free_.begin(), pool.free_.begin() + static_cast<std::ptrdiff_t>(k));
    }
    for (Block* b : evicted) {
      std::free(b->data);
      delete b;
    }
  }

  std::mutex mutex_;
  std::vector<Block*> free_;
  size_t cached_bytes_ = 0;
  size_t in_use_bytes_ = 0;  // held by live tensors
};

// at::empty on the CPU, its storage from the BufferPool.
inline at::Tensor empty_pooled(at::IntArrayRef sizes, at::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &BufferPool::get(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

}  // namespace fastattn_cpu
