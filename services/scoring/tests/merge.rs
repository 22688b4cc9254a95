//! Merging two customers: the survivor's features combine both, and one
//! evaluation of the survivor moves it where the combined history says.

use chrono::{DateTime, Duration, TimeZone, Utc};
use clm_proto::touchpoint::Channel;
use clm_scoring::{
    AcquisitionStatus, CompiledModel, CustomerFeatures, Health, LifecycleStage, LifecycleState,
    ProfileFacts, TouchpointFacts, default_model,
};

fn day(n: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2024, 5, 1, 8, 0, 0).unwrap() + Duration::days(n)
}

fn customer(model: &CompiledModel, touches: &[(&str, i64)]) -> (CustomerFeatures, LifecycleState) {
    let mut features = CustomerFeatures::new();
    let mut state = LifecycleState::new();
    for (kind, at) in touches {
        features.apply(&TouchpointFacts {
            touchpoint_type: kind,
            channel: Channel::Web,
            occurred_at: day(*at),
            revenue: None,
        });
        state = model.evaluate(&features, &state, day(*at)).snapshot.state;
    }
    (features, state)
}

#[test]
fn merging_a_buyer_into_a_lead_moves_the_survivor() {
    let model = CompiledModel::compile(default_model()).unwrap();
    let (mut lead, lead_state) = customer(&model, &[("page_view", 0), ("form_submit", 1)]);
    lead.set_profile(ProfileFacts {
        identified: true,
        ..ProfileFacts::default()
    });
    let (buyer, buyer_state) = customer(&model, &[("purchase", 5), ("renewal", 30)]);
    assert_eq!(
        (lead_state.stage, lead_state.acquisition_status),
        (
            Some(LifecycleStage::Acquisition),
            Some(AcquisitionStatus::Lead)
        )
    );
    assert_eq!(buyer_state.stage, Some(LifecycleStage::Retention));

    // the lead survives: it moves to RETENTION
    let mut survivor = lead.clone();
    survivor.merge(&buyer);
    assert_eq!(survivor.touchpoint_count(), 4);
    assert_eq!(survivor.first_touch_at(), Some(day(0)));
    assert_eq!(survivor.converted_at(), Some(day(5)));
    assert!(survivor.profile().identified);
    let evaluation = model.evaluate(&survivor, &lead_state, day(31));
    let transition = evaluation.transition.expect("the survivor moves");
    assert_eq!(transition.stage_rule.as_deref(), Some("retained"));
    assert_eq!(
        transition.from.acquisition_status,
        Some(AcquisitionStatus::Lead)
    );
    assert_eq!(
        evaluation.snapshot.state.stage,
        Some(LifecycleStage::Retention)
    );
    assert_eq!(evaluation.snapshot.state.health, Some(Health::Active));

    // the buyer survives: it stays where it is
    let mut other_way = buyer.clone();
    other_way.merge(&lead);
    let evaluation = model.evaluate(&other_way, &buyer_state, day(31));
    assert_eq!(evaluation.transition, None);
    assert_eq!(
        evaluation.snapshot.state.stage,
        Some(LifecycleStage::Retention)
    );
    // either way, the combined counts are the same
    assert_eq!(other_way.touchpoint_count(), survivor.touchpoint_count());
    assert_eq!(
        other_way.type_history("purchase"),
        survivor.type_history("purchase")
    );
}
