//! The stream's timeline (`TANDEM_CUDA_TIMELINE=1`): the kernels compile with a record, in
//! each launch's first block, of when it reached its wait for the previous kernel and when
//! the wait let it go (`wait_for_previous_kernel`, kernels/common.cuh). A launch's span on
//! the critical path runs from its own release (the previous kernel's end) to the next
//! launch's (its own end). ncu times kernels one at a time, and `TANDEM_CUDA_REPEAT` cannot
//! repeat the kernels that update in place, so neither shows this. cuBLAS's GEMMs (prefill,
//! decode batches past 8) record nothing: their time lands in the span of the kernel before
//! them.

use std::collections::HashMap;
use std::sync::{OnceLock, PoisonError};

use super::{CudaBackend, device_error};
use crate::error::{EngineError, Result};

/// Records the kernels hold (`TIMELINE_CAPACITY`); more launches between two reads are an
/// error, not a silent cut.
pub(super) const TIMELINE_CAPACITY: usize = 65_536;

/// Whether `TANDEM_CUDA_TIMELINE=1` asks for the timeline (unset or 0: no). Read once: it
/// decides how the process's kernels compile.
pub(super) fn timeline_enabled() -> Result<bool> {
    static ENABLED: OnceLock<std::result::Result<bool, String>> = OnceLock::new();
    ENABLED
        .get_or_init(|| timeline_switch(std::env::var("TANDEM_CUDA_TIMELINE").ok().as_deref()))
        .clone()
        .map_err(EngineError::Unsupported)
}

/// The switch's value read: any other than 0 or 1 is refused, not taken for off.
fn timeline_switch(value: Option<&str>) -> std::result::Result<bool, String> {
    match value.map(str::trim) {
        None | Some("" | "0") => Ok(false),
        Some("1") => Ok(true),
        Some(other) => Err(format!("TANDEM_CUDA_TIMELINE={other}: expected 0 or 1")),
    }
}

/// One launch on the timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimelineLaunch {
    pub kernel: &'static str,
    /// How long its first block waited for the previous kernel (ns): how early it was in
    /// place, its launch and prologue hidden under the kernel before.
    pub head_start_ns: u64,
    /// From its release to the next launch's (ns); none for the last launch read. The last
    /// launch of a decode step also holds the host's turn between steps.
    pub span_ns: Option<u64>,
}

/// One kernel's launches on a timeline, summed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelOnTimeline {
    pub kernel: &'static str,
    pub launches: usize,
    /// Spans summed (ns), over the launches that have one.
    pub span_ns: u64,
    pub head_start_ns: u64,
}

/// The launches in order, from the kernels' records (launch id, arrived, released; one or
/// more a launch, in any order) and the kernels the host launched, in order. Launch ids
/// grow with launch order, so the k-th distinct id is the k-th launch.
pub(super) fn launches_on_timeline(
    records: &[[u64; 3]],
    launched: &[&'static str],
) -> Result<Vec<TimelineLaunch>> {
    let mut first_of_launch: HashMap<u64, [u64; 2]> = HashMap::new();
    for &[launch, arrived, released] in records {
        let times = first_of_launch.entry(launch).or_insert([arrived, released]);
        *times = [times[0].min(arrived), times[1].min(released)];
    }
    let mut ordered: Vec<(u64, [u64; 2])> = first_of_launch.into_iter().collect();
    ordered.sort_unstable_by_key(|&(launch, _)| launch);
    if ordered.len() != launched.len() {
        return Err(EngineError::Unsupported(format!(
            "timeline: {} launches recorded, {} made (a kernel that never waits for the previous one, or one launched elsewhere)",
            ordered.len(),
            launched.len()
        )));
    }
    Ok(ordered
        .iter()
        .zip(launched)
        .enumerate()
        .map(|(i, (&(_, [arrived, released]), &kernel))| TimelineLaunch {
            kernel,
            head_start_ns: released.saturating_sub(arrived),
            span_ns: ordered
                .get(i + 1)
                .map(|&(_, [_, next])| next.saturating_sub(released)),
        })
        .collect())
}

/// The launches summed by kernel, the longest total span first.
pub fn timeline_by_kernel(launches: &[TimelineLaunch]) -> Vec<KernelOnTimeline> {
    let mut by_kernel: Vec<KernelOnTimeline> = Vec::new();
    for launch in launches {
        let index = match by_kernel.iter().position(|k| k.kernel == launch.kernel) {
            Some(index) => index,
            None => {
                by_kernel.push(KernelOnTimeline {
                    kernel: launch.kernel,
                    launches: 0,
                    span_ns: 0,
                    head_start_ns: 0,
                });
                by_kernel.len() - 1
            }
        };
        let kernel = &mut by_kernel[index];
        kernel.launches += 1;
        kernel.span_ns += launch.span_ns.unwrap_or(0);
        kernel.head_start_ns += launch.head_start_ns;
    }
    by_kernel.sort_by_key(|k| std::cmp::Reverse(k.span_ns));
    by_kernel
}

impl CudaBackend {
    /// The launches since the last call, on the timeline, and a fresh one started; `None`
    /// unless `TANDEM_CUDA_TIMELINE=1`. Waits for the stream.
    pub fn take_timeline(&self) -> Result<Option<Vec<TimelineLaunch>>> {
        let Some(launched) = &self.timeline else {
            return Ok(None);
        };
        self.synchronize()?;
        let launched =
            std::mem::take(&mut *launched.lock().unwrap_or_else(PoisonError::into_inner));
        let error = |what: &str, e| device_error(&format!("timeline: {what}"), e);
        let module = self.kernels.module();
        let mut count_symbol = module
            .get_global("timeline_count", &self.stream)
            .map_err(|e| error("finding its count", e))?;
        let mut count = [0u8; 4];
        self.stream
            .memcpy_dtoh(&count_symbol, &mut count)
            .map_err(|e| error("reading its count", e))?;
        self.stream
            .memcpy_htod(&[0u8; 4], &mut count_symbol)
            .map_err(|e| error("resetting its count", e))?;
        let count = u32::from_ne_bytes(count) as usize;
        if count > TIMELINE_CAPACITY {
            return Err(EngineError::Unsupported(format!(
                "timeline: {count} records since the last read, over the {TIMELINE_CAPACITY} the kernels hold; read it more often"
            )));
        }
        let records_symbol = module
            .get_global("timeline_records", &self.stream)
            .map_err(|e| error("finding its records", e))?;
        let mut bytes = vec![0u8; count * 24];
        self.stream
            .memcpy_dtoh(&records_symbol.slice(..bytes.len()), &mut bytes)
            .map_err(|e| error("reading its records", e))?;
        let records: Vec<[u64; 3]> = bytes
            .chunks_exact(24)
            .map(|record| {
                let word = |i: usize| {
                    u64::from_ne_bytes(record[8 * i..8 * i + 8].try_into().expect("8 bytes"))
                };
                [word(0), word(1), word(2)]
            })
            .collect();
        launches_on_timeline(&records, &launched).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernels::tests::assert_host_constants;
    use super::*;

    #[test]
    fn launches_pair_with_records_by_launch_id_and_span_release_to_release() {
        // Launch 7 recorded twice (it waits twice), records out of order.
        let records = [[9, 250, 400], [7, 100, 130], [8, 120, 300], [7, 160, 170]];
        let launches =
            launches_on_timeline(&records, &["norm", "gemv", "attention"]).expect("paired");
        let expected = [
            ("norm", 30, Some(170)),
            ("gemv", 180, Some(100)),
            ("attention", 150, None),
        ];
        for (launch, (kernel, head_start_ns, span_ns)) in launches.iter().zip(expected) {
            assert_eq!(
                launch,
                &TimelineLaunch {
                    kernel,
                    head_start_ns,
                    span_ns
                }
            );
        }
        let summed = timeline_by_kernel(&[launches.clone(), launches].concat());
        assert_eq!(summed[0].kernel, "norm");
        assert_eq!((summed[0].launches, summed[0].span_ns), (2, 340));
        assert_eq!(summed.last().map(|k| k.span_ns), Some(0));
    }

    #[test]
    fn a_launch_that_recorded_nothing_is_an_error() {
        let error = launches_on_timeline(&[[1, 0, 5]], &["norm", "gemv"]).unwrap_err();
        assert!(
            error.to_string().contains("1 launches recorded, 2 made"),
            "{error}"
        );
    }

    #[test]
    fn the_switch_takes_0_or_1_and_refuses_anything_else() {
        assert_eq!(timeline_switch(None), Ok(false));
        assert_eq!(timeline_switch(Some("0")), Ok(false));
        assert_eq!(timeline_switch(Some("1")), Ok(true));
        let error = timeline_switch(Some("yes")).unwrap_err();
        assert!(
            error.contains("TANDEM_CUDA_TIMELINE=yes: expected 0 or 1"),
            "{error}"
        );
    }

    #[test]
    fn the_capacity_matches_the_kernels() {
        assert_host_constants(&[("TIMELINE_CAPACITY", TIMELINE_CAPACITY)]);
    }
}
