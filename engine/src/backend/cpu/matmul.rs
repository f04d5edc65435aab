//! The one safe doorway to the `gemm` crate's raw-pointer API.

use gemm::Parallelism;

/// Products smaller than this many multiply-adds run on one thread: splitting them costs more
/// than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 18;

/// Whether a product may use the rayon pool. Expert GEMMs already run one per rayon task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    Pool,
    Single,
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]`, all row-major and densely packed.
pub(crate) fn matmul(
    dst: &mut [f32],
    lhs: &[f32],
    rhs: &[f32],
    (m, k, n): (usize, usize, usize),
    threads: Threads,
) {
    assert_eq!(dst.len(), m * n, "matmul dst");
    assert_eq!(lhs.len(), m * k, "matmul lhs");
    assert_eq!(rhs.len(), k * n, "matmul rhs");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst.fill(0.0);
        return;
    }
    let parallelism = match threads {
        Threads::Pool if m * k * n >= PARALLEL_MIN_FLOPS => Parallelism::Rayon(0),
        _ => Parallelism::None,
    };
    #[allow(unsafe_code)]
    // SAFETY: the asserts above prove each slice holds exactly the row-major matrix its strides
    // describe, `dst` is borrowed mutably so it aliases neither input, and with `read_dst` false
    // the prior contents of `dst` are never read.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}
