//! The kernels' CUDA C (`kernels/`), compiled with NVRTC once per process for the device's
//! architecture, and the functions loaded from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use cudarc::driver::sys::CUfunction_attribute;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

use super::{attention, device_error, moe, timeline};
use crate::error::{EngineError, Result};

/// The parts of `kernels/` concatenated in order, each after a `#line` directive so NVRTC's
/// messages name the part and its line.
macro_rules! kernel_source {
    ($($part:literal),+) => {
        concat!($("#line 1 \"", $part, "\"\n", include_str!(concat!("kernels/", $part))),+)
    };
}

/// The kernels' CUDA C source: one NVRTC program of these parts, each free to use what the
/// parts before it define.
pub const KERNELS_SOURCE: &str = kernel_source!(
    "common.cuh",
    "tensor_core.cuh",
    "rows.cu",
    "attention.cu",
    "sampling.cu",
    "moe_routing.cu",
    "matvec.cu",
    "moe_gemm.cu",
    "attention_mma.cu"
);

/// The kernel enum, its list and every kernel's name, from one table.
macro_rules! kernel_table {
    ($($kernel:ident => $name:literal,)+) => {
        /// A kernel `KERNELS_SOURCE` defines: launches name kernels by this, never by a string.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(super) enum Kernel {
            $($kernel,)+
        }

        impl Kernel {
            /// Every kernel, in discriminant order.
            const ALL: [Kernel; KERNEL_NAMES.len()] = [$(Kernel::$kernel,)+];

            /// Its name in the PTX.
            pub(super) const fn name(self) -> &'static str {
                KERNEL_NAMES[self as usize]
            }

            /// The kernel of that name in the PTX.
            pub(super) fn named(name: &str) -> Option<Kernel> {
                Kernel::ALL.into_iter().find(|kernel| kernel.name() == name)
            }
        }

        /// Every kernel `KERNELS_SOURCE` defines.
        pub const KERNEL_NAMES: [&str; [$($name,)+].len()] = [$($name,)+];
    };
}

kernel_table! {
    Embed => "embed",
    RmsNorm => "rms_norm",
    RmsNormShort => "rms_norm_short",
    AddAssign => "add_assign",
    AddBias => "add_bias",
    ScaleRows => "scale_rows",
    Swiglu => "swiglu",
    Rope => "rope",
    StoreRows => "store_rows",
    LoadRows => "load_rows",
    CopyKvRows => "copy_kv_rows",
    ToBf16 => "to_bf16",
    GatherRows => "gather_rows",
    ScatterAddWeighted => "scatter_add_weighted",
    AttentionSplit => "attention_split",
    AttentionCombine => "attention_combine",
    AttentionPrefill => "attention_prefill",
    AttentionPrefillMma => "attention_prefill_mma",
    AttentionPrefillMmaHd128 => "attention_prefill_mma_hd128",
    AttentionPrefillWgmmaHd128 => "attention_prefill_wgmma_hd128",
    AttentionDecodeMma => "attention_decode_mma",
    AttentionDecodeMmaHd128 => "attention_decode_mma_hd128",
    GreedyPartial => "greedy_partial",
    GreedyCombine => "greedy_combine",
    MoeRoute => "moe_route",
    MoeOffsets => "moe_offsets",
    MoeRoutePlace => "moe_route_place",
    MoePlace => "moe_place",
    MoeGateUp => "moe_gate_up",
    MoeGateUpOne => "moe_gate_up_one",
    MoeDown => "moe_down",
    MoeDownOne => "moe_down_one",
    MoeGemmGateUp => "moe_gemm_gate_up",
    MoeGemmDown => "moe_gemm_down",
    MoeWgmmaGateUp => "moe_wgmma_gate_up",
    MoeWgmmaDown => "moe_wgmma_down",
    MoeWgmmaNarrowGateUp => "moe_wgmma_narrow_gate_up",
    MoeWgmmaNarrowDown => "moe_wgmma_narrow_down",
    MoeCombine => "moe_combine",
    MoeCombineAddRmsNorm => "moe_combine_add_rms_norm",
    GemvRows => "gemv_rows",
    GemvRowParts => "gemv_row_parts",
    GemvRowsMma => "gemv_rows_mma",
    AddRmsNorm => "add_rms_norm",
    AttentionInputs => "attention_inputs",
}

/// The compute capability whose kernels compile as `sm_90a`.
pub(super) const HOPPER: (i32, i32) = (9, 0);

/// The architecture the kernels are compiled for on a device of this compute capability:
/// Hopper's own (`sm_90a`), whose warpgroup instructions other devices lack, else the
/// family's.
fn kernel_arch((major, minor): (i32, i32)) -> String {
    if (major, minor) == HOPPER {
        "sm_90a".into()
    } else {
        format!("sm_{major}{minor}")
    }
}

/// Compiles the kernels for `arch` (`sm_90`, `sm_90a`, …) to PTX, with the timeline's records
/// where `timeline` (`TANDEM_CUDA_TIMELINE`). Needs libnvrtc, not a GPU.
pub fn compile_kernels(arch: &'static str, timeline: bool) -> Result<String> {
    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(EngineError::DeviceUnavailable {
            device: "cuda".into(),
            reason: "libnvrtc not found".into(),
        });
    }
    let options = CompileOptions {
        arch: Some(arch),
        name: Some("tandem_kernels.cu".into()),
        options: if timeline {
            vec!["-DTANDEM_TIMELINE".into()]
        } else {
            Vec::new()
        },
        ..CompileOptions::default()
    };
    let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS_SOURCE, options)
        .map_err(|e| device_error("compiling the kernels", e))?;
    Ok(ptx.to_src())
}

/// PTX by architecture, compiled once per process.
fn cached_ptx(arch: &str) -> Result<Ptx> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(src) = cache.get(arch) {
        return Ok(Ptx::from_src(src.clone()));
    }
    // NVRTC takes the architecture as a 'static str; there are only a few, each leaked once.
    let arch_static: &'static str = Box::leak(arch.to_owned().into_boxed_str());
    let src = compile_kernels(arch_static, timeline::timeline_enabled()?)?;
    cache.insert(arch.to_owned(), src.clone());
    Ok(Ptx::from_src(src))
}

/// Every kernel, loaded for one device, indexed by [`Kernel`].
pub(super) struct Kernels {
    module: Arc<CudaModule>,
    functions: Vec<CudaFunction>,
}

impl Kernels {
    /// The kernels built for a device of compute capability `capability`, those that take
    /// more dynamic shared memory than a block gets by default opted in to it.
    pub(super) fn load(ctx: &Arc<CudaContext>, capability: (i32, i32)) -> Result<Self> {
        let module = ctx
            .load_module(cached_ptx(&kernel_arch(capability))?)
            .map_err(|e| device_error("loading the kernels", e))?;
        let functions = Kernel::ALL
            .iter()
            .map(|kernel| {
                module
                    .load_function(kernel.name())
                    .map_err(|e| device_error(&format!("kernel {}", kernel.name()), e))
            })
            .collect::<Result<Vec<_>>>()?;
        let kernels = Self { module, functions };
        for (kernel, bytes) in [
            (Kernel::AttentionPrefillMma, attention::FLASH_SHARED_BYTES),
            (
                Kernel::AttentionPrefillMmaHd128,
                attention::FLASH_SHARED_BYTES,
            ),
            (
                Kernel::AttentionPrefillWgmmaHd128,
                attention::FLASH_WGMMA_SHARED_BYTES,
            ),
            (Kernel::MoeGemmGateUp, moe::GEMM_SHARED_BYTES),
            (Kernel::MoeGemmDown, moe::GEMM_SHARED_BYTES),
            (Kernel::MoeWgmmaGateUp, moe::WGMMA_SHARED_BYTES),
            (Kernel::MoeWgmmaDown, moe::WGMMA_SHARED_BYTES),
            (Kernel::MoeWgmmaNarrowGateUp, moe::WGMMA_NARROW_SHARED_BYTES),
            (Kernel::MoeWgmmaNarrowDown, moe::WGMMA_NARROW_SHARED_BYTES),
        ] {
            let name = kernel.name();
            kernels
                .get(kernel)
                .set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| device_error(&format!("opting {name} in to its shared memory"), e))?;
        }
        Ok(kernels)
    }

    /// The module the kernels were loaded from (its globals: the timeline's records).
    pub(super) fn module(&self) -> &Arc<CudaModule> {
        &self.module
    }

    pub(super) fn get(&self, kernel: Kernel) -> &CudaFunction {
        // `functions` holds every kernel in discriminant order.
        &self.functions[kernel as usize]
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Every object-like `#define NAME value` of `source`, by name, without line comments.
    fn defines(source: &str) -> HashMap<&str, &str> {
        source
            .lines()
            .filter_map(|line| line.trim_start().strip_prefix("#define "))
            .filter_map(|rest| rest.split_once(' '))
            .filter(|(name, _)| !name.contains('('))
            .map(|(name, value)| (name, value.split("//").next().unwrap_or(value).trim()))
            .collect()
    }

    /// `expression` (integers, define names, `+ - * /` and parentheses) evaluated over the
    /// defines, as the CUDA preprocessor and compiler would.
    fn evaluate(expression: &str, defines: &HashMap<&str, &str>) -> i64 {
        let spaced = ["(", ")", "+", "-", "*", "/"]
            .iter()
            .fold(expression.to_owned(), |s, op| {
                s.replace(op, &format!(" {op} "))
            });
        let tokens: Vec<&str> = spaced.split_whitespace().collect();
        let mut at = 0;
        let value = sum(&tokens, &mut at, defines);
        assert_eq!(at, tokens.len(), "trailing tokens in {expression:?}");
        value
    }

    fn sum(tokens: &[&str], at: &mut usize, defines: &HashMap<&str, &str>) -> i64 {
        let mut value = product(tokens, at, defines);
        while let Some(&op @ ("+" | "-")) = tokens.get(*at) {
            *at += 1;
            let rhs = product(tokens, at, defines);
            value = if op == "+" { value + rhs } else { value - rhs };
        }
        value
    }

    fn product(tokens: &[&str], at: &mut usize, defines: &HashMap<&str, &str>) -> i64 {
        let mut value = operand(tokens, at, defines);
        while let Some(&op @ ("*" | "/")) = tokens.get(*at) {
            *at += 1;
            let rhs = operand(tokens, at, defines);
            value = if op == "*" { value * rhs } else { value / rhs };
        }
        value
    }

    fn operand(tokens: &[&str], at: &mut usize, defines: &HashMap<&str, &str>) -> i64 {
        let token = tokens[*at];
        *at += 1;
        if token == "(" {
            let value = sum(tokens, at, defines);
            assert_eq!(tokens.get(*at), Some(&")"), "unbalanced parentheses");
            *at += 1;
            return value;
        }
        if let Ok(n) = token.parse() {
            return n;
        }
        let value = defines
            .get(token)
            .unwrap_or_else(|| panic!("{token} is not defined in the kernels"));
        evaluate(value, defines)
    }

    /// Fails unless each host constant equals what its kernel expression evaluates to: the
    /// launch shapes and buffer sizes the host uses must be the kernels' own.
    pub(in crate::backend::cuda) fn assert_host_constants(pairs: &[(&str, usize)]) {
        let defines = defines(KERNELS_SOURCE);
        for &(expression, host) in pairs {
            let kernel = evaluate(expression, &defines);
            assert_eq!(
                kernel, host as i64,
                "{expression} is {kernel} in the kernels but {host} on the host"
            );
        }
    }

    #[test]
    fn defines_skip_macros_with_arguments_and_line_comments() {
        let source =
            "#define A 3 // why\n#define F(x) (x)\n  #define INDENTED 1\n#define B (A + 1)";
        let found = defines(source);
        assert_eq!(
            found,
            HashMap::from([("A", "3"), ("INDENTED", "1"), ("B", "(A + 1)")])
        );
        assert_eq!(evaluate("B * A", &found), 12);
    }

    #[test]
    fn evaluate_follows_precedence_and_nested_defines() {
        let defines = HashMap::from([("A", "(2 + 3)"), ("B", "A * 4")]);
        assert_eq!(evaluate("B - 6 / 2", &defines), 17);
        assert_eq!(evaluate("(B - 6) / 2", &defines), 7);
    }

    #[test]
    fn every_kernel_is_loaded_at_its_own_index_under_its_name() {
        for (index, kernel) in Kernel::ALL.iter().enumerate() {
            assert_eq!(*kernel as usize, index);
            assert_eq!(kernel.name(), KERNEL_NAMES[index]);
        }
        assert_eq!(Kernel::MoeWgmmaDown.name(), "moe_wgmma_down");
    }

    /// The text that must wait: a kernel's own, or where the kernel only forwards to a
    /// template (`moe_gate_up_one` to `moe_gate_up_group<1, …>`), that template's.
    fn waiting_text(kernel: &str) -> &str {
        if kernel.contains("previous_kernel();") {
            return kernel;
        }
        let body = &kernel[kernel.find('{').unwrap_or(0)..];
        body.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '<'))
            .find_map(|word| word.split_once('<').map(|(name, _)| name))
            .filter(|name| !name.is_empty())
            .and_then(|name| KERNELS_SOURCE.split(&format!("void {name}(")).nth(1))
            .and_then(|definition| definition.split("\n}\n").next())
            .unwrap_or(kernel)
    }

    #[test]
    fn every_kernel_waits_for_the_previous_one_before_it_returns() {
        for kernel in KERNELS_SOURCE.split("__global__").skip(1) {
            let name = kernel.split('(').next().unwrap_or(kernel).trim();
            let kernel = waiting_text(kernel);
            let wait = kernel
                .find("previous_kernel();")
                .unwrap_or_else(|| panic!("kernel {name} never waits for the previous one"));
            if let Some(first_return) = kernel.find("return") {
                assert!(
                    wait < first_return,
                    "kernel {name} may return before it waits for the previous one"
                );
            }
        }
    }

    #[test]
    fn kernels_compile_as_sm_90a_only_on_hopper() {
        assert_eq!(kernel_arch(HOPPER), "sm_90a");
        assert_eq!(kernel_arch((8, 0)), "sm_80");
        assert_eq!(kernel_arch((10, 0)), "sm_100");
    }
}
