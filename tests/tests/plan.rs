//! `tandemctl plan` and `tandemctl calibrate` as operators run them.

use std::process::Command;

use tandem_tests::{binary, log_dir, tandemctl_json, tandemctl_ok};

fn sim_file(path: &str) -> String {
    format!("{}/../sim/{path}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn plan_prints_a_pareto_front_and_writes_helm_values_for_its_choice() {
    let dir = log_dir("plan");
    let values = dir.join("values.yaml");
    let model = sim_file("models/qwen3-30b-a3b.json");
    let trace = dir.join("trace.jsonl");
    let lines: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "{{\"arrival_s\": {}, \"prompt_len\": {}, \"output_len\": 64}}",
                f64::from(i) * 0.1,
                256 + 64 * (i % 4)
            )
        })
        .collect();
    std::fs::write(&trace, lines.join("\n")).expect("trace");
    let values_arg = values.to_string_lossy().into_owned();
    let trace_arg = trace.to_string_lossy().into_owned();
    for workload in [
        vec!["--isl", "512", "--osl", "64"],
        vec!["--trace", &trace_arg],
    ] {
        let mut args = vec![
            "plan",
            "--model",
            &model,
            "--hardware",
            "h100",
            "--gpus",
            "4",
            "--requests",
            "100",
            "--at",
            "20",
            "--helm-values",
            &values_arg,
            "-o",
            "json",
        ];
        args.extend(workload);
        let plan = tandemctl_json(&args);
        let front = plan["pareto"].as_array().expect("pareto");
        assert!(!front.is_empty(), "{plan}");
        let chosen = &plan["chosen"]["deployment"];
        let gpus = chosen["prefill_groups"].as_u64().expect("groups")
            * chosen["tp"].as_u64().expect("tp")
            + chosen["decode_groups"].as_u64().expect("groups")
                * chosen["ep"].as_u64().expect("ep");
        assert_eq!(gpus, 4, "{plan}");
        let written = std::fs::read_to_string(&values).expect("helm values");
        assert!(
            written.contains(&format!("tp: {}", chosen["tp"])),
            "{written}"
        );
    }

    let refused = Command::new(binary("tandemctl"))
        .args([
            "plan",
            "--model",
            &model,
            "--hardware",
            "tpu-v9",
            "--gpus",
            "8",
        ])
        .output()
        .expect("tandemctl runs");
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("gb200-nvl72"), "{stderr}");
}

#[test]
fn calibrate_fits_the_h100_bench_within_20_percent_and_the_profile_plans() {
    let dir = log_dir("calibrate");
    let profile = dir.join("h100-tandem.json");
    let profile_arg = profile.to_string_lossy().into_owned();
    let bench = sim_file("calibration/h100-engine-bench.json");
    let bench_2_layers = sim_file("calibration/h100-engine-bench-2-layers.json");
    let table = tandemctl_ok(&[
        "calibrate",
        "--bench",
        &bench,
        "--bench",
        &bench_2_layers,
        "--base",
        "h100",
        "--out",
        &profile_arg,
    ]);
    assert!(
        table.contains("decode step, batch 128, 8 layers"),
        "{table}"
    );
    assert!(table.contains("prefill 2048 tokens, 2 layers"), "{table}");
    let model = sim_file("models/qwen3-30b-a3b.json");
    let plan = tandemctl_json(&[
        "plan",
        "--model",
        &model,
        "--hardware",
        &profile_arg,
        "--gpus",
        "2",
        "--isl",
        "256",
        "--osl",
        "32",
        "--requests",
        "50",
        "-o",
        "json",
    ]);
    assert!(
        !plan["pareto"].as_array().expect("pareto").is_empty(),
        "{plan}"
    );
}
