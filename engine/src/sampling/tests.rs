use super::*;

fn sampler(params: SamplingParams) -> Sampler {
    Sampler::new(params, 0)
}

fn sampled(params: SamplingParams, logits: &[f32], draws: usize) -> Vec<u32> {
    let mut s = sampler(params);
    (0..draws).map(|_| s.sample(logits, &[], &[]).0).collect()
}

#[test]
fn greedy_takes_the_first_maximum() {
    let (token, lp) = sampler(SamplingParams::greedy()).sample(&[0.0, 3.0, 3.0, 1.0], &[], &[]);
    assert_eq!(token, 1);
    assert!(lp.chosen < 0.0 && lp.chosen > -1.0);
}

#[test]
fn logprobs_come_from_the_raw_distribution_with_top_alternatives() {
    let params = SamplingParams {
        top_logprobs: 2,
        ..SamplingParams::greedy()
    };
    let logits = [1.0f32, 2.0, 0.0];
    let (_, lp) = sampler(params).sample(&logits, &[], &[]);
    let z: f32 = logits.iter().map(|l| l.exp()).sum::<f32>().ln();
    assert!((lp.chosen - (2.0 - z)).abs() < 1e-6);
    assert_eq!(
        lp.top.iter().map(|t| t.token).collect::<Vec<_>>(),
        vec![1, 0]
    );
    assert!((lp.top[1].logprob - (1.0 - z)).abs() < 1e-6);
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.1).collect();
    let params = |seed| SamplingParams {
        temperature: 1.0,
        seed: Some(seed),
        ..SamplingParams::greedy()
    };
    assert_eq!(
        sampled(params(3), &logits, 40),
        sampled(params(3), &logits, 40)
    );
    assert_ne!(
        sampled(params(3), &logits, 40),
        sampled(params(4), &logits, 40)
    );
}

#[test]
fn top_k_top_p_and_min_p_restrict_the_support() {
    let logits = [4.0f32, 3.0, 2.0, 1.0, 0.0];
    let base = SamplingParams {
        temperature: 1.0,
        seed: Some(1),
        ..SamplingParams::greedy()
    };
    let top_k = sampled(
        SamplingParams {
            top_k: Some(2),
            ..base.clone()
        },
        &logits,
        300,
    );
    assert!(top_k.iter().all(|&t| t < 2) && top_k.contains(&1));
    // p(0) ≈ 0.64, p(0)+p(1) ≈ 0.88.
    let top_p = sampled(
        SamplingParams {
            top_p: 0.8,
            ..base.clone()
        },
        &logits,
        300,
    );
    assert!(top_p.iter().all(|&t| t < 2) && top_p.contains(&1));
    // p(2)/p(0) = e^-2 ≈ 0.135 survives a 0.1 floor; p(3)/p(0) ≈ 0.05 does not.
    let min_p = sampled(
        SamplingParams {
            min_p: 0.1,
            ..base.clone()
        },
        &logits,
        600,
    );
    assert!(min_p.iter().all(|&t| t < 3) && min_p.contains(&2));
}

#[test]
fn low_temperature_concentrates_high_temperature_spreads() {
    let logits = [1.0f32, 0.0, 0.0, 0.0];
    let at = |t: f32| {
        let p = SamplingParams {
            temperature: t,
            seed: Some(9),
            ..SamplingParams::greedy()
        };
        sampled(p, &logits, 400).iter().filter(|&&x| x == 0).count()
    };
    assert!(at(0.1) > 390, "{}", at(0.1));
    assert!(at(10.0) < 160, "{}", at(10.0));
}

#[test]
fn penalties_demote_tokens_already_seen() {
    let logits = [2.0f32, 1.9, -1.0];
    let rep = SamplingParams {
        repetition_penalty: 2.0,
        ..SamplingParams::greedy()
    };
    assert_eq!(
        sampler(rep).sample(&logits, &[0], &[]).0,
        1,
        "prompt token 0 divided to 1.0"
    );
    let presence = SamplingParams {
        presence_penalty: 0.5,
        ..SamplingParams::greedy()
    };
    assert_eq!(sampler(presence.clone()).sample(&logits, &[], &[0]).0, 1);
    assert_eq!(
        sampler(presence).sample(&logits, &[0], &[]).0,
        0,
        "presence counts output only"
    );
    let freq = SamplingParams {
        frequency_penalty: 0.06,
        ..SamplingParams::greedy()
    };
    assert_eq!(
        sampler(freq.clone()).sample(&logits, &[], &[0]).0,
        0,
        "one use: 1.94 > 1.9"
    );
    assert_eq!(
        sampler(freq).sample(&logits, &[], &[0, 0]).0,
        1,
        "two uses: 1.88 < 1.9"
    );
}

#[test]
fn validate_names_field_range_and_value() {
    let cases = [
        (
            SamplingParams {
                temperature: f32::NAN,
                ..SamplingParams::greedy()
            },
            "temperature",
        ),
        (
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::greedy()
            },
            "temperature",
        ),
        (
            SamplingParams {
                top_p: 1.5,
                ..SamplingParams::greedy()
            },
            "top_p must be in (0, 1], got 1.5",
        ),
        (
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::greedy()
            },
            "top_p",
        ),
        (
            SamplingParams {
                min_p: 2.0,
                ..SamplingParams::greedy()
            },
            "min_p",
        ),
        (
            SamplingParams {
                top_k: Some(0),
                ..SamplingParams::greedy()
            },
            "top_k",
        ),
        (
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::greedy()
            },
            "repetition_penalty",
        ),
        (
            SamplingParams {
                presence_penalty: 3.0,
                ..SamplingParams::greedy()
            },
            "presence_penalty must be in [-2, 2], got 3",
        ),
        (
            SamplingParams {
                top_logprobs: 21,
                ..SamplingParams::greedy()
            },
            "top_logprobs must be <= 20, got 21",
        ),
    ];
    for (params, expected) in cases {
        let e = params.validate().expect_err("invalid").to_string();
        assert!(e.contains(expected), "{expected}: {e}");
    }
    assert!(
        SamplingParams {
            top_logprobs: 20,
            ..SamplingParams::greedy()
        }
        .validate()
        .is_ok()
    );
}
