//! Device memory: allocations, uploads (the small repeated ones reused), and the copy
//! bandwidth decode is measured against.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use cudarc::driver::sys::{CUdevice_attribute, CUmemPool_attribute};
use cudarc::driver::{CudaContext, CudaSlice, DeviceRepr, ValidAsZeroBits, sys};

use super::{CudaBackend, CudaTensor, device_error};
use crate::error::Result;

/// The last upload made for each purpose, used again while the host values are the same:
/// every layer of a forward pass uploads the same rope table, cache slots and attention
/// metadata, and every step the same expert table per layer. Small synchronous copies, ten a
/// layer, were a large share of a small batch's step. Kernels only read these buffers.
pub(super) struct ReusedUploads<T> {
    last: Mutex<HashMap<UploadKey, Uploaded<T>>>,
}

/// Values on the host and the device copy made of them.
struct Uploaded<T> {
    host: Vec<T>,
    device: Arc<CudaSlice<T>>,
}

/// A purpose and a discriminator (0, or what tells apart the layers of one purpose).
pub(super) type UploadKey = (&'static str, u64);

impl<T> Default for ReusedUploads<T> {
    fn default() -> Self {
        Self {
            last: Mutex::new(HashMap::new()),
        }
    }
}

/// Keeps the memory the backend frees in the device's pool, which its stream-ordered
/// allocations come from. With the pool's default release threshold (0) the driver takes
/// it back at every synchronization and maps it again for the next allocation: the bench's
/// GEMM ceiling lost ~9% to mapping its output, and the op profile (a synchronization
/// around every op) read about twice a prefill's time. A process so keeps its largest
/// step's working set reserved, as PyTorch's caching allocator does; a worker's KV blocks
/// (`--num-blocks`) are allocated at start, before any step.
pub(super) fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    let pools = ctx
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .map_err(|e| device_error("asking for memory pools", e))?;
    if pools == 0 {
        // Allocations then do not come from a pool.
        return Ok(());
    }
    let mut pool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: the pool is the context's device's current one, and the release threshold
    // attribute takes a u64.
    unsafe {
        sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device())
            .result()
            .map_err(|e| device_error("finding the memory pool", e))?;
        sys::cuMemPoolSetAttribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&raw mut threshold).cast(),
        )
        .result()
        .map_err(|e| device_error("keeping freed memory in the pool", e))
    }
}

impl CudaBackend {
    /// Device-to-device copy bandwidth in bytes/s, counting bytes read and written: the HBM
    /// figure decode is measured against.
    pub fn copy_bandwidth(&self, bytes: usize, repeats: usize) -> Result<f64> {
        let src = self.zeros::<u8>(bytes)?;
        let mut dst = self.zeros::<u8>(bytes)?;
        let copy = |dst: &mut CudaSlice<u8>| {
            self.stream
                .memcpy_dtod(&src, dst)
                .map_err(|e| device_error("device copy", e))
        };
        copy(&mut dst)?;
        self.synchronize()?;
        let started = std::time::Instant::now();
        for _ in 0..repeats {
            copy(&mut dst)?;
        }
        self.synchronize()?;
        Ok((2 * bytes * repeats) as f64 / started.elapsed().as_secs_f64())
    }

    pub(super) fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(|e| device_error("allocating device memory", e))
    }

    pub(super) fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        if host.is_empty() {
            return self.uninit::<T>(1);
        }
        self.stream
            .clone_htod(host)
            .map_err(|e| device_error("copying to the device", e))
    }

    /// `host` on the device, uploaded again only when it differs from the last values
    /// uploaded for `key` (see [`ReusedUploads`]).
    pub(super) fn upload_reused<T: DeviceRepr + Clone + PartialEq>(
        &self,
        cache: &ReusedUploads<T>,
        key: UploadKey,
        host: &[T],
    ) -> Result<Arc<CudaSlice<T>>> {
        let mut last = cache.last.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(uploaded) = last.get(&key)
            && uploaded.host[..] == *host
        {
            return Ok(Arc::clone(&uploaded.device));
        }
        let device = Arc::new(self.upload(host)?);
        // Replacing an entry frees its buffer in stream order, after the kernels reading it.
        let uploaded = Uploaded {
            host: host.to_vec(),
            device: Arc::clone(&device),
        };
        last.insert(key, uploaded);
        Ok(device)
    }

    /// `device` copied to the host. The time the host waits here (for the work queued ahead
    /// of the copy, then the copy) adds to [`Self::take_host_wait`].
    pub(super) fn read_back<T: DeviceRepr + Default + Clone>(
        &self,
        device: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        let started = Instant::now();
        let host = self
            .stream
            .clone_dtoh(device)
            .map_err(|e| device_error("copying to the host", e))?;
        let waited = nanos_since(started);
        self.host_wait_ns.fetch_add(waited, Ordering::Relaxed);
        // The copy waited for everything queued: the stream is empty from here.
        self.idle_since_ns
            .store(self.nanos_since_start().max(1), Ordering::Relaxed);
        Ok(host)
    }

    fn nanos_since_start(&self) -> u64 {
        nanos_since(self.started)
    }

    /// Ends the idle time a copy back to the host began (a kernel is being launched).
    pub(super) fn end_idle(&self) {
        let since = self.idle_since_ns.swap(0, Ordering::Relaxed);
        if since != 0 {
            let idle = self.nanos_since_start().saturating_sub(since);
            self.idle_ns.fetch_add(idle, Ordering::Relaxed);
        }
    }

    /// Seconds the device sat idle since the last call, from each copy back to the host
    /// (which leaves the stream empty) to the next kernel launch. Over a decode step: the
    /// host's work between a step's tokens and the next step's first kernel.
    pub fn take_idle(&self) -> f64 {
        self.idle_ns.swap(0, Ordering::Relaxed) as f64 * 1e-9
    }

    /// Seconds the host has spent waiting for copies back from the device since the last
    /// call. Over a decode step, near zero means the host set the step's pace (the GPU had
    /// finished when the tokens were asked for); near the step's time, the GPU did.
    pub fn take_host_wait(&self) -> f64 {
        self.host_wait_ns.swap(0, Ordering::Relaxed) as f64 * 1e-9
    }

    /// Memory a kernel will fully write before anything reads it (at least one element).
    pub(super) fn uninit<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller hands the buffer to a kernel or GEMM that writes all of it
        // before it is read, or never reads it (empty uploads).
        unsafe { self.stream.alloc::<T>(n.max(1)) }.map_err(|e| device_error("allocating", e))
    }

    /// An output tensor a kernel fills completely.
    pub(super) fn output(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            data: self.uninit(rows * cols)?,
            bf16: None,
        })
    }

    pub(super) fn tensor(&self, rows: usize, cols: usize) -> Result<CudaTensor> {
        Ok(CudaTensor {
            rows,
            cols,
            data: self.zeros(rows * cols)?,
            bf16: None,
        })
    }
}

/// Nanoseconds elapsed since `start` (saturating: a u64 holds 584 years).
fn nanos_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
