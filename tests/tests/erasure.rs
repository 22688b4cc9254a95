//! Erasure on the embedded default leaves nothing readable in any store
//! file: the SQLite databases and their write-ahead logs are read as raw
//! bytes after EraseCustomer, looking for every piece of personal data the
//! customer, their touchpoints and their survey answers carried.

#![allow(missing_docs)]

use std::time::Duration;

use clm_proto::common::{CustomerReference, customer_reference};
use clm_proto::feedback as fb;
use clm_proto::feedback::survey_service_client::SurveyServiceClient;
use clm_proto::identity::customer_service_client::CustomerServiceClient;
use clm_proto::identity::{self as pb, Customer};
use clm_proto::touchpoint as tp;
use clm_proto::touchpoint::touchpoint_service_client::TouchpointServiceClient;
use clm_tests::ClmServer;

/// Personal data that must not survive the erasure, as stored (e-mails in
/// lower case, phones in E.164).
const SECRETS: &[&str] = &[
    "Zebediah",
    "Quillfeather",
    "zebediah.quill@example.org",
    "+442079460123",
    "crm-zq-48151623",
    "attribute-value-kept-secret",
    "property-value-kept-secret",
    "free-text-answer-kept-secret",
];

/// The files of every SQLite database in `dir` that hold any of `needles`,
/// with how often.
fn files_holding(dir: &std::path::Path, needles: &[&str]) -> Vec<(String, &'static str, usize)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.contains(".db") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for needle in SECRETS.iter().filter(|s| needles.contains(s)) {
            let count = bytes
                .windows(needle.len())
                .filter(|window| *window == needle.as_bytes())
                .count();
            if count > 0 {
                found.push((name.clone(), *needle, count));
            }
        }
    }
    found
}

#[tokio::test]
async fn erased_personal_data_is_in_no_store_file() {
    // Scoring too: it keeps the profile facts fit rules read (company,
    // attributes), in its features and its kept inputs.
    let server = ClmServer::start(&["serve"], &[]).await.unwrap();
    let mut customers = CustomerServiceClient::new(server.channel().await);
    let mut touchpoints = TouchpointServiceClient::new(server.channel().await);

    let created = customers
        .create_customer(pb::CreateCustomerRequest {
            customer: Some(Customer {
                given_name: "Zebediah".into(),
                family_name: "Quillfeather".into(),
                emails: vec!["Zebediah.Quill@example.org".into()],
                phones: vec!["+44 20 7946 0123".into()],
                external_ids: vec![pb::ExternalId {
                    source: "crm".into(),
                    id: "crm-zq-48151623".into(),
                }],
                attributes: [("note".to_owned(), "attribute-value-kept-secret".to_owned())].into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .customer
        .unwrap();
    // Rewrite the profile a few times, so that old versions of its pages
    // are in the WAL too.
    for round in 0..3 {
        customers
            .update_customer(pb::UpdateCustomerRequest {
                customer: Some(Customer {
                    id: created.id.clone(),
                    company: format!("Company {round}"),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["company".into()],
                }),
                expected_version: 0,
            })
            .await
            .unwrap();
    }
    let by_id = CustomerReference {
        reference: Some(customer_reference::Reference::CustomerId(
            created.id.clone(),
        )),
    };
    let recorded = touchpoints
        .record_touchpoints(tp::RecordTouchpointsRequest {
            touchpoints: (0..5)
                .map(|i| tp::Touchpoint {
                    event_id: format!("erasure-{i}"),
                    customer: Some(by_id.clone()),
                    channel: tp::Channel::Web as i32,
                    r#type: "page_view".into(),
                    properties: [("note".to_owned(), "property-value-kept-secret".to_owned())]
                        .into(),
                    ..Default::default()
                })
                .collect(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(recorded.stored_count, 5);
    // A survey answer with free text.
    let mut surveys = SurveyServiceClient::new(server.channel().await);
    let survey = surveys
        .create_survey(fb::CreateSurveyRequest {
            survey: Some(fb::Survey {
                display_name: "Erasure".into(),
                kind: fb::SurveyKind::Custom as i32,
                questions: vec![fb::Question {
                    id: "why".into(),
                    text: "Anything to add?".into(),
                    r#type: fb::QuestionType::FreeText as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .survey
        .unwrap();
    surveys
        .record_response(fb::RecordResponseRequest {
            response: Some(fb::SurveyResponse {
                response_id: "erasure-answer".into(),
                survey_id: survey.id.clone(),
                customer: Some(by_id.clone()),
                answers: vec![fb::Answer {
                    question_id: "why".into(),
                    value: Some(fb::answer::Value::Text(
                        "My note: free-text-answer-kept-secret".into(),
                    )),
                    sentiment: None,
                }],
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // Scoring has read the profile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !files_holding(server.data_dir(), SECRETS)
        .iter()
        .any(|(file, secret, _)| {
            file.starts_with("scoring") && *secret == "attribute-value-kept-secret"
        })
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "scoring never stored the profile: {:?}",
            files_holding(server.data_dir(), SECRETS)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !files_holding(server.data_dir(), SECRETS).is_empty(),
        "the test looks for data that was stored"
    );
    assert!(
        files_holding(server.data_dir(), SECRETS)
            .iter()
            .any(|(file, secret, _)| file.starts_with("feedback")
                && *secret == "free-text-answer-kept-secret"),
        "feedback stored the free text: {:?}",
        files_holding(server.data_dir(), SECRETS)
    );

    customers
        .erase_customer(pb::EraseCustomerRequest {
            customer_id: created.id.clone(),
            reason: "ticket 42".into(),
            requested_by: "e2e".into(),
        })
        .await
        .unwrap();
    // The profile is gone from every identity file once the call returns.
    let identity_left: Vec<_> = files_holding(server.data_dir(), SECRETS)
        .into_iter()
        .filter(|(file, _, _)| file.starts_with("identity"))
        .collect();
    assert_eq!(identity_left, [], "personal data left in identity's files");

    // Touchpoints strips properties, scoring forgets the profile and
    // feedback deletes free text when they read the erasure from the log.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let left = files_holding(server.data_dir(), SECRETS);
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "personal data left in the store files: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
