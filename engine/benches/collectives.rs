//! The host collective's all-to-all and all-reduce, as GB/s per rank against a plain memcpy
//! of the same bytes measured in the same run (the most one rank could move through memory).
//!
//! `cargo bench -p tandem-engine --bench collectives`

use std::hint::black_box;
use std::time::{Duration, Instant};

use tandem_engine::{Collective, CpuBackend, CpuTensor, HostCollective};

const HIDDEN: usize = 2048;
const ROWS: [usize; 3] = [64, 512, 4096];
const RANKS: [usize; 2] = [2, 4];
const MIN_MEASURE: Duration = Duration::from_millis(300);

/// Seconds per call of `op`, repeated on every rank's thread until `MIN_MEASURE` passes on
/// rank 0 (the ranks agree on the count through the collective itself).
fn per_call(ranks: usize, op: impl Fn(&HostCollective) + Sync) -> f64 {
    let comms = HostCollective::group(ranks, Duration::from_secs(60));
    let iterations = {
        let started = Instant::now();
        std::thread::scope(|s| {
            for comm in &comms {
                let op = &op;
                s.spawn(move || op(comm));
            }
        });
        (MIN_MEASURE.as_secs_f64() / started.elapsed().as_secs_f64().max(1e-6)).ceil() as usize
    }
    .clamp(3, 10_000);
    let started = Instant::now();
    std::thread::scope(|s| {
        for comm in &comms {
            let op = &op;
            s.spawn(move || (0..iterations).for_each(|_| op(comm)));
        }
    });
    started.elapsed().as_secs_f64() / iterations as f64
}

fn memcpy_rate(bytes: usize) -> f64 {
    let src = vec![1.0f32; bytes / 4];
    let mut dst = vec![0.0f32; bytes / 4];
    let mut iterations = 0;
    let started = Instant::now();
    while started.elapsed() < MIN_MEASURE {
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        iterations += 1;
    }
    bytes as f64 * iterations as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    println!("host collective, f32 rows of {HIDDEN}; GB/s per rank of the bytes each rank sends");
    println!(
        "{:<12} {:>5} {:>7} {:>10} {:>12} {:>12} {:>8}",
        "op", "ranks", "rows", "MB/rank", "GB/s", "memcpy GB/s", "ratio"
    );
    for ranks in RANKS {
        for rows in ROWS {
            let bytes = rows * HIDDEN * 4;
            let baseline = memcpy_rate(bytes);
            let tensor = CpuTensor {
                rows,
                cols: HIDDEN,
                data: vec![0.5; rows * HIDDEN],
            };
            let split: Vec<usize> = (0..ranks)
                .map(|r| (r + 1) * rows / ranks - r * rows / ranks)
                .collect();
            let all_to_all = per_call(ranks, |comm| {
                let moved =
                    Collective::<CpuBackend>::all_to_all_v(comm, &CpuBackend, &tensor, &split);
                black_box(moved.expect("all_to_all_v"));
            });
            let all_reduce = per_call(ranks, |comm| {
                let mut x = tensor.clone();
                Collective::<CpuBackend>::all_reduce_sum(comm, &CpuBackend, &mut x)
                    .expect("all_reduce");
                black_box(x);
            });
            for (op, seconds) in [("all_to_all_v", all_to_all), ("all_reduce", all_reduce)] {
                let rate = bytes as f64 / seconds;
                println!(
                    "{op:<12} {ranks:>5} {rows:>7} {:>10.1} {:>12.2} {:>12.2} {:>8.2}",
                    bytes as f64 / 1e6,
                    rate / 1e9,
                    baseline / 1e9,
                    rate / baseline
                );
            }
        }
    }
}
