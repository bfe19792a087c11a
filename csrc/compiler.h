/* Access helpers shared by the C core. */
#ifndef VIRTIO_PY_COMPILER_H
#define VIRTIO_PY_COMPILER_H

/* One load or store of shared memory, never merged, split or repeated. */
#define READ_ONCE(x)      (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, v)  (*(volatile __typeof__(x) *)&(x) = (v))
#define load_acquire(p)   __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define virtio_mb()       __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define virtio_rmb()      __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define virtio_wmb()      __atomic_thread_fence(__ATOMIC_RELEASE)
#define likely(x)         __builtin_expect(!!(x), 1)
#define unlikely(x)       __builtin_expect(!!(x), 0)

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield" ::: "memory");
#else
	__asm__ __volatile__("" ::: "memory");
#endif
}

#endif
