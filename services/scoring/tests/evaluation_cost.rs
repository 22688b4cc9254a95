//! The CPU time of one evaluation of a typical customer (20 touchpoints,
//! default model). Printed, not asserted: the figure depends on the build
//! profile and the machine (`cargo test -p clm-scoring --release --test
//! evaluation_cost -- --nocapture` for the figure that matters).

use chrono::{TimeZone, Utc};
use clm_scoring::bench::{time_evaluation, typical_customer};
use clm_scoring::{CompiledModel, default_model};

#[test]
fn prints_the_median_cpu_time_of_one_evaluation() {
    let model = CompiledModel::compile(default_model()).unwrap();
    let now = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
    let customer = typical_customer(7, 20, now);
    assert_eq!(customer.touchpoint_count(), 20);
    let explained = model.explain(&customer, &Default::default(), now);
    assert!(explained.evaluation.snapshot.state.stage.is_some());

    let timing = time_evaluation(&model, &customer, now, 101, 50);
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    println!(
        "evaluation of a typical customer ({profile} build, {}): median {:?}, p90 {:?} over {} samples of {}",
        if timing.cpu_time {
            "thread CPU time"
        } else {
            "wall clock"
        },
        timing.median,
        timing.p90,
        timing.samples,
        timing.evaluations_per_sample,
    );
}
