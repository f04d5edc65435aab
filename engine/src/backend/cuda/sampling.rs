//! Greedy sampling on the device.

use cudarc::driver::LaunchConfig;

use super::{CudaBackend, CudaTensor, ELEMENT_THREADS, Kernel, ROW_THREADS, blocks, shape_error};
use crate::error::Result;

/// Logits one block of `greedy_partial` takes: a row's vocabulary is spread over many blocks
/// (a single block per row waited on its loads for ~0.3 ms at a 152k vocabulary).
const GREEDY_PART_LEN: usize = 4096;

impl CudaBackend {
    /// The trait's `greedy`: each row's pick and logprob, found on the device; only the
    /// pairs come back.
    pub(super) fn greedy_on_device(
        &self,
        logits: &CudaTensor,
        vocab: usize,
    ) -> Result<Vec<(u32, f32)>> {
        let _timer = self.timed("greedy");
        if logits.cols != vocab {
            return Err(shape_error(
                "greedy",
                format!("{} columns, vocab {vocab}", logits.cols),
            ));
        }
        if logits.rows == 0 {
            return Ok(Vec::new());
        }
        let rows = logits.rows;
        let parts = vocab.div_ceil(GREEDY_PART_LEN);
        let mut part_best = self.uninit::<f32>(rows * parts)?;
        let mut part_index = self.uninit::<i32>(rows * parts)?;
        let mut part_sum = self.uninit::<f32>(rows * parts)?;
        let (vocab_i, part_len) = (vocab as i32, GREEDY_PART_LEN as i32);
        let mut launch = self.launch(Kernel::GreedyPartial);
        launch
            .arg(&logits.data)
            .arg(&mut part_best)
            .arg(&mut part_index)
            .arg(&mut part_sum)
            .arg(&vocab_i)
            .arg(&part_len);
        let config = LaunchConfig {
            grid_dim: (rows as u32, parts as u32, 1),
            block_dim: (ROW_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one block of ROW_THREADS (= the kernel's 256 shared slots) per (row, part)
        // of vocab logits, writing that part's entry of rows · parts.
        unsafe { launch.launch(config) }?;
        let mut picks = self.uninit::<u32>(2 * rows)?;
        let (rows_i, parts_i) = (rows as i32, parts as i32);
        let mut launch = self.launch(Kernel::GreedyCombine);
        launch
            .arg(&part_best)
            .arg(&part_index)
            .arg(&part_sum)
            .arg(&mut picks)
            .arg(&rows_i)
            .arg(&parts_i);
        // SAFETY: one thread per row reading its parts, writing its two entries of picks.
        unsafe { launch.launch(blocks(rows, ELEMENT_THREADS)) }?;
        let picks = self.read_back(&picks)?;
        Ok(picks
            .chunks_exact(2)
            .take(rows)
            .map(|p| (p[0], f32::from_bits(p[1])))
            .collect())
    }
}
