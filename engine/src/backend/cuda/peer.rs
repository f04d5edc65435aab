//! KV stores shared between processes on one GPU through CUDA IPC: a decode worker shares its
//! stores, a prefill worker on the same GPU opens them and copies each prompt's K and V
//! straight into the reserved slots, so the cache never goes through host memory or a socket.
//! Stores are allocated with `cuMemAlloc` for that: the stream-ordered pool's memory cannot be
//! shared with a plain IPC handle.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, result, sys};

use super::{CudaBackend, CudaKvStore, Kernel, device_error, per_row, shape_error, slots_i32};
use crate::error::{EngineError, Result};

const HANDLE_MAGIC: u32 = 0x5356_4B54; // "TKVS"
const IPC_HANDLE_BYTES: usize = 64;
/// magic | slots u64 | width u32 | K handle | V handle.
const HANDLE_BYTES: usize = 4 + 8 + 4 + 2 * IPC_HANDLE_BYTES;

/// One layer of another process's KV store, mapped into this process.
pub struct CudaPeerKv {
    stream: Arc<CudaStream>,
    slots: usize,
    width: usize,
    k: sys::CUdeviceptr,
    v: sys::CUdeviceptr,
}

impl Drop for CudaPeerKv {
    fn drop(&mut self) {
        // Copies into the mapping must end before it is unmapped.
        let _ = self.stream.synchronize();
        for ptr in [self.k, self.v] {
            // A failed unmap leaves nothing to recover: the mapping goes with the process.
            // SAFETY: `ptr` came from cuIpcOpenMemHandle in this context and is closed once.
            let _ = unsafe { sys::cuIpcCloseMemHandle(ptr) };
        }
    }
}

impl CudaBackend {
    /// Zeroed bf16 memory another process can open with an IPC handle.
    pub(super) fn shareable_zeros(&self, n: usize) -> Result<CudaSlice<u16>> {
        let bytes = n.max(1) * std::mem::size_of::<u16>();
        let ctx = self.stream.context();
        ctx.bind_to_thread()
            .map_err(|e| device_error("binding the context", e))?;
        // SAFETY: a plain allocation of `bytes`; the slice made from it owns it, frees it
        // once (freeing cuMemAlloc memory on a stream is allowed) and is zeroed before use.
        let mut slice = unsafe {
            let ptr = result::malloc_sync(bytes)
                .map_err(|e| device_error("allocating shareable device memory", e))?;
            self.stream.upgrade_device_ptr::<u16>(ptr, n.max(1))
        };
        self.stream
            .memset_zeros(&mut slice)
            .map_err(|e| device_error("zeroing device memory", e))?;
        Ok(slice)
    }

    pub(super) fn share_store(&self, store: &CudaKvStore) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(HANDLE_BYTES);
        out.extend_from_slice(&HANDLE_MAGIC.to_le_bytes());
        let slots = store.spec.num_blocks * store.spec.block_size;
        out.extend_from_slice(&(slots as u64).to_le_bytes());
        out.extend_from_slice(&(store.width() as u32).to_le_bytes());
        for data in [&store.k, &store.v] {
            let (ptr, _sync) = cudarc::driver::DevicePtr::device_ptr(data, &self.stream);
            let mut handle = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
            // SAFETY: `ptr` is the base of a cuMemAlloc allocation this store owns.
            let handle = unsafe {
                sys::cuIpcGetMemHandle(handle.as_mut_ptr(), ptr)
                    .result()
                    .map_err(|e| device_error("sharing the kv cache", e))?;
                handle.assume_init()
            };
            out.extend(handle.reserved.iter().map(|&b| b as u8));
        }
        Ok(out)
    }

    pub(super) fn open_peer_store(&self, handle: &[u8]) -> Result<CudaPeerKv> {
        let invalid = |why: &str| EngineError::InvalidRequest(format!("shared kv store: {why}"));
        if handle.len() != HANDLE_BYTES {
            return Err(invalid(&format!(
                "{} bytes, expected {HANDLE_BYTES}",
                handle.len()
            )));
        }
        let (magic, rest) = handle.split_at(4);
        if magic != HANDLE_MAGIC.to_le_bytes() {
            return Err(invalid("not a handle this backend made"));
        }
        let (slots, rest) = rest.split_at(8);
        let (width, rest) = rest.split_at(4);
        let slots = u64::from_le_bytes(slots.try_into().expect("8 bytes")) as usize;
        let width = u32::from_le_bytes(width.try_into().expect("4 bytes")) as usize;
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| device_error("binding the context", e))?;
        let mut opened = Vec::with_capacity(2);
        for bytes in rest.chunks_exact(IPC_HANDLE_BYTES) {
            let mut ipc = sys::CUipcMemHandle {
                reserved: [0; IPC_HANDLE_BYTES],
            };
            for (dst, &src) in ipc.reserved.iter_mut().zip(bytes) {
                *dst = src as std::ffi::c_char;
            }
            let mut ptr = 0;
            let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
            // SAFETY: the handle is 64 opaque bytes; the driver checks it and fails on a bad one.
            let result = unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, ipc, flags) }.result();
            if let Err(e) = result {
                for ptr in opened {
                    // SAFETY: opened just above in this context, closed once.
                    let _ = unsafe { sys::cuIpcCloseMemHandle(ptr) };
                }
                return Err(device_error("opening a peer's kv cache", e));
            }
            opened.push(ptr);
        }
        Ok(CudaPeerKv {
            stream: Arc::clone(&self.stream),
            slots,
            width,
            k: opened[0],
            v: opened[1],
        })
    }

    pub(super) fn write_peer_store(
        &self,
        store: &CudaKvStore,
        slots: &[usize],
        peer: &CudaPeerKv,
        peer_slots: &[usize],
    ) -> Result<()> {
        let _timer = self.timed("write_peer_kv");
        let width = store.width();
        if peer.width != width || peer_slots.len() != slots.len() {
            return Err(shape_error(
                "write_peer_kv",
                format!(
                    "{} rows of width {width} into {} places of width {}",
                    slots.len(),
                    peer_slots.len(),
                    peer.width
                ),
            ));
        }
        if let Some(bad) = peer_slots.iter().find(|&&s| s >= peer.slots) {
            return Err(shape_error(
                "write_peer_kv",
                format!("slot {bad} is outside the peer's cache of {}", peer.slots),
            ));
        }
        if slots.is_empty() {
            return Ok(());
        }
        let from = self.checked_slots(store, slots, "write_peer_kv")?;
        let to = self.upload(&slots_i32(peer_slots))?;
        let w = width as i32;
        let mut launch = self.launch(Kernel::CopyKvRows);
        launch
            .arg(&store.k)
            .arg(&store.v)
            .arg(&peer.k)
            .arg(&peer.v)
            .arg(from.as_ref())
            .arg(&to)
            .arg(&w);
        // SAFETY: one block per row; source slots were checked against this store and
        // destination slots against the peer's, both `width` wide.
        unsafe { launch.launch(per_row(slots.len())) }
    }
}
