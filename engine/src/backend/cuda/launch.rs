//! Kernel launches through `cuLaunchKernelEx`, so a launch can carry programmatic dependent
//! launch (cudarc's launch builder sets no launch attributes). With it (compute capability
//! 9.0 and up), a kernel's blocks start while the previous kernel drains, and each kernel
//! waits for the previous one's writes itself (`wait_for_previous_kernel` in
//! `kernels/common.cuh`): a decode step's ~100 short kernels then overlap their launch and
//! ramp with the previous kernel's tail.

use std::ffi::c_void;
use std::sync::PoisonError;

use cudarc::driver::sys::{
    CUlaunchAttribute, CUlaunchAttributeID, CUlaunchAttributeValue, CUlaunchConfig,
};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, LaunchConfig};

use super::kernels::Kernel;
use super::{CudaBackend, device_error};
use crate::error::{EngineError, Result};

/// The most arguments a launch holds (`moe_route_place` and the attention kernels take 14);
/// a kernel test checks every kernel's parameters against it.
pub const MAX_ARGS: usize = 16;

/// Whether kernels may start before the previous kernel ends: on devices that have
/// programmatic dependent launch (9.0 and up), unless `TANDEM_CUDA_PDL=0` turns it off (to
/// measure what it gains).
pub(super) fn dependent_launch_enabled((major, _): (i32, i32)) -> bool {
    major >= 9 && std::env::var("TANDEM_CUDA_PDL").map_or(true, |v| v != "0")
}

/// The kernels `TANDEM_CUDA_REPEAT` (comma-separated names) asks to launch twice: how much
/// a step grows then is what the kernel costs inside the stream, its overlap with the kernels
/// around it included, where a profiler times each kernel alone. Only kernels whose second
/// run writes what the first did.
pub(super) fn repeated_kernels() -> Result<Vec<Kernel>> {
    let Ok(list) = std::env::var("TANDEM_CUDA_REPEAT") else {
        return Ok(Vec::new());
    };
    parse_kernel_list(&list)
}

fn parse_kernel_list(list: &str) -> Result<Vec<Kernel>> {
    let error = |why: String| EngineError::Unsupported(format!("TANDEM_CUDA_REPEAT: {why}"));
    list.split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| match Kernel::named(name) {
            None => Err(error(format!("no kernel is named {name:?}"))),
            Some(kernel) if CHANGED_BY_A_SECOND_RUN.contains(&kernel) => Err(error(format!(
                "{name} updates its output in place or counts with atomics, so a second run \
                 would change the results (routing counts past their tables)"
            ))),
            Some(kernel) => Ok(kernel),
        })
        .collect()
}

/// Kernels that add to their output in place or count with atomics: not to be repeated.
const CHANGED_BY_A_SECOND_RUN: [Kernel; 12] = [
    Kernel::AddAssign,
    Kernel::AddBias,
    Kernel::ScaleRows,
    Kernel::Rope,
    Kernel::AttentionInputs,
    Kernel::ScatterAddWeighted,
    Kernel::AddRmsNorm,
    Kernel::MoeCombineAddRmsNorm,
    Kernel::MoeRoute,
    Kernel::MoeOffsets,
    Kernel::MoeRoutePlace,
    Kernel::MoePlace,
];

/// A kernel argument: a device buffer's address (`&mut` for a buffer the kernel writes) or a
/// scalar, as the 8-byte word the driver reads its `sizeof(parameter)` bytes from.
pub(super) trait KernelArg {
    fn word(self, backend: &CudaBackend) -> u64;
}

macro_rules! buffer_args {
    ($($buffer:ty),+) => {
        $(impl<T> KernelArg for $buffer {
            fn word(self, backend: &CudaBackend) -> u64 {
                self.device_ptr(&backend.stream).0
            }
        })+
    };
}

buffer_args!(
    &CudaSlice<T>,
    &mut CudaSlice<T>,
    &CudaView<'_, T>,
    &mut CudaViewMut<'_, T>
);

/// The word whose first bytes in memory are `bytes`, where the driver reads a parameter of
/// `N` bytes.
fn word_of<const N: usize>(bytes: [u8; N]) -> u64 {
    let mut word = [0u8; 8];
    word[..N].copy_from_slice(&bytes);
    u64::from_ne_bytes(word)
}

macro_rules! scalar_args {
    ($($t:ty),+) => {
        $(impl KernelArg for &$t {
            fn word(self, _: &CudaBackend) -> u64 {
                word_of(self.to_ne_bytes())
            }
        })+
    };
}

scalar_args!(i32, u32, f32, u64);

/// An optional buffer: a null pointer where absent.
impl<A: KernelArg> KernelArg for Option<A> {
    fn word(self, backend: &CudaBackend) -> u64 {
        self.map_or(0, |arg| arg.word(backend))
    }
}

/// One kernel's launch: its arguments, in order.
pub(super) struct Launch<'a> {
    backend: &'a CudaBackend,
    kernel: Kernel,
    words: [u64; MAX_ARGS],
    count: usize,
}

impl<'a> Launch<'a> {
    pub(super) fn new(backend: &'a CudaBackend, kernel: Kernel) -> Self {
        Self {
            backend,
            kernel,
            words: [0; MAX_ARGS],
            count: 0,
        }
    }

    pub(super) fn arg(&mut self, arg: impl KernelArg) -> &mut Self {
        assert!(
            self.count < MAX_ARGS,
            "{} takes more than {MAX_ARGS} arguments",
            self.kernel.name()
        );
        self.words[self.count] = arg.word(self.backend);
        self.count += 1;
        self
    }

    /// Queues the kernel on the backend's stream.
    ///
    /// # Safety
    /// The arguments must be the kernel's parameters in order and type, and the kernel must
    /// stay within the buffers they name for `config`'s grid.
    pub(super) unsafe fn launch(&mut self, config: LaunchConfig) -> Result<()> {
        let backend = self.backend;
        let name = self.kernel.name();
        backend
            .stream
            .context()
            .bind_to_thread()
            .map_err(|e| device_error(name, e))?;
        let mut params: [*mut c_void; MAX_ARGS] = [std::ptr::null_mut(); MAX_ARGS];
        for (param, word) in params.iter_mut().zip(self.words.iter_mut()) {
            *param = (word as *mut u64).cast();
        }
        // SAFETY: a plain-data union; the attribute reads the int member set here.
        let mut value: CUlaunchAttributeValue = unsafe { std::mem::zeroed() };
        value.programmaticStreamSerializationAllowed = 1;
        let mut overlap = CUlaunchAttribute {
            id: CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let (grid, block) = (config.grid_dim, config.block_dim);
        let dependent = backend.dependent_launch;
        let driver_config = CUlaunchConfig {
            gridDimX: grid.0,
            gridDimY: grid.1,
            gridDimZ: grid.2,
            blockDimX: block.0,
            blockDimY: block.1,
            blockDimZ: block.2,
            sharedMemBytes: config.shared_mem_bytes,
            hStream: backend.stream.cu_stream(),
            attrs: if dependent {
                &mut overlap
            } else {
                std::ptr::null_mut()
            },
            numAttrs: u32::from(dependent),
        };
        backend.end_idle();
        let launches = 1 + usize::from(backend.repeated.contains(&self.kernel));
        for _ in 0..launches {
            // SAFETY: `params` points at `words`, which outlive the call; the caller vouches
            // for the arguments and the grid.
            unsafe {
                cudarc::driver::sys::cuLaunchKernelEx(
                    &driver_config,
                    backend.function(self.kernel).cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
            .map_err(|e| device_error(name, e))?;
            if let Some(timeline) = &backend.timeline {
                timeline
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(name);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scalar_fills_the_first_bytes_of_its_word() {
        let word = word_of((-2i32).to_ne_bytes());
        assert_eq!(word.to_ne_bytes()[..4], (-2i32).to_ne_bytes());
        assert_eq!(word.to_ne_bytes()[4..], [0; 4]);
        let word = word_of(1.5f32.to_ne_bytes());
        assert_eq!(
            f32::from_ne_bytes(word.to_ne_bytes()[..4].try_into().unwrap()),
            1.5
        );
        assert_eq!(word_of(u64::MAX.to_ne_bytes()), u64::MAX);
    }

    #[test]
    fn a_repeat_list_names_kernels() {
        let kernels = parse_kernel_list("attention_combine, gemv_row_parts,").unwrap();
        assert_eq!(kernels, [Kernel::AttentionCombine, Kernel::GemvRowParts]);
        let error = parse_kernel_list("attention_combine,gemv").unwrap_err();
        assert!(error.to_string().contains("\"gemv\""), "{error}");
        let error = parse_kernel_list("moe_route_place").unwrap_err();
        assert!(error.to_string().contains("atomics"), "{error}");
    }

    #[test]
    fn dependent_launch_needs_compute_capability_9() {
        if std::env::var_os("TANDEM_CUDA_PDL").is_some() {
            return;
        }
        assert!(!dependent_launch_enabled((8, 9)));
        assert!(dependent_launch_enabled((9, 0)));
        assert!(dependent_launch_enabled((10, 0)));
    }
}
