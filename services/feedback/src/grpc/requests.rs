//! Reading and checking requests: each check names the field it refuses,
//! and a request is read whole before anything is stored.

use std::collections::HashSet;
use std::time::Duration;

use clm_platform::FieldViolation;
use clm_platform::error::Violations;
use clm_platform::validate;
use clm_proto::feedback as pb;

use crate::model::{
    Answer, AnswerValue, DEFAULT_RESPONSE_WINDOW, FatiguePolicy, MAX_TEXT_CHARS, Question,
    QuestionType, SurveyDefinition, SurveyKind, SurveyState, Trigger, TriggerSource,
};
use crate::triggers::{self, MAX_CONDITION_CHARS};

const DAY: u64 = 86_400;
const MAX_QUESTIONS: usize = 50;
const MAX_TRIGGERS: usize = 10;
const MAX_CHOICES: usize = 50;

/// A name of `[a-z0-9_]`, 1 to 64 characters (question ids, trigger names).
fn identifier(field: &str, value: &str) -> Result<(), FieldViolation> {
    if value.is_empty() {
        return Err(FieldViolation::with_reason(
            field,
            "REQUIRED",
            "is required",
        ));
    }
    if value.len() > 64
        || !value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(FieldViolation::with_reason(
            field,
            "INVALID_FORMAT",
            "must be 1 to 64 characters of a-z, 0-9 and '_'",
        ));
    }
    Ok(())
}

/// A duration between 0 and `max_days` days.
pub fn duration(
    field: &str,
    raw: &prost_types::Duration,
    min: Duration,
    max_days: u64,
) -> Result<Duration, FieldViolation> {
    if raw.seconds < 0 || raw.nanos < 0 || raw.nanos >= 1_000_000_000 {
        return Err(FieldViolation::with_reason(
            field,
            "OUT_OF_RANGE",
            "must not be negative, with nanos 0 to 999999999",
        ));
    }
    let value = Duration::new(raw.seconds as u64, raw.nanos as u32);
    if value < min || value > Duration::from_secs(max_days * DAY) {
        return Err(FieldViolation::with_reason(
            field,
            "OUT_OF_RANGE",
            format!("must be between {}s and {max_days} days", min.as_secs()),
        ));
    }
    Ok(value)
}

/// The protobuf duration of a duration.
pub fn to_duration(value: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: value.as_secs() as i64,
        nanos: value.subsec_nanos() as i32,
    }
}

/// The kind of a survey in a request.
pub fn kind(field: &str, raw: i32) -> Result<SurveyKind, FieldViolation> {
    Ok(
        match validate::enum_value::<pb::SurveyKind>(field, raw, false)? {
            pb::SurveyKind::Nps => SurveyKind::Nps,
            pb::SurveyKind::Csat => SurveyKind::Csat,
            pb::SurveyKind::Ces => SurveyKind::Ces,
            pb::SurveyKind::Custom | pb::SurveyKind::Unspecified => SurveyKind::Custom,
        },
    )
}

/// The state a create or update may set: ACTIVE or PAUSED (unset: ACTIVE).
pub fn settable_state(field: &str, raw: i32) -> Result<SurveyState, FieldViolation> {
    match validate::enum_value::<pb::SurveyState>(field, raw, true)? {
        pb::SurveyState::Unspecified | pb::SurveyState::Active => Ok(SurveyState::Active),
        pb::SurveyState::Paused => Ok(SurveyState::Paused),
        pb::SurveyState::Archived => Err(FieldViolation::with_reason(
            field,
            "INVALID_STATE",
            "can only be ACTIVE or PAUSED here: ArchiveSurvey archives",
        )),
    }
}

/// The questions of a survey.
pub fn questions(violations: &mut Violations, field: &str, raw: &[pb::Question]) -> Vec<Question> {
    if raw.is_empty() {
        violations.check::<()>(Err(FieldViolation::with_reason(
            field,
            "REQUIRED",
            "at least one question is required",
        )));
    } else if raw.len() > MAX_QUESTIONS {
        violations.check::<()>(Err(FieldViolation::with_reason(
            field,
            "TOO_MANY",
            format!(
                "holds {} questions, at most {MAX_QUESTIONS} are allowed",
                raw.len()
            ),
        )));
    }
    let mut seen = HashSet::new();
    let mut questions = Vec::new();
    for (index, question) in raw.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let id_ok = violations
            .check(identifier(&format!("{at}.id"), &question.id))
            .is_some();
        if id_ok && !seen.insert(question.id.as_str()) {
            violations.add(
                format!("{at}.id"),
                format!("'{}' is the id of an earlier question", question.id),
            );
        }
        violations.check(validate::text(
            &format!("{at}.text"),
            &question.text,
            true,
            1000,
        ));
        if let Some(kind) = question_type(violations, &at, question) {
            questions.push(Question {
                id: question.id.clone(),
                text: question.text.clone(),
                kind,
                required: question.required,
            });
        }
    }
    questions
}

fn question_type(
    violations: &mut Violations,
    at: &str,
    question: &pb::Question,
) -> Option<QuestionType> {
    let kind = violations.check(validate::enum_value::<pb::QuestionType>(
        &format!("{at}.type"),
        question.r#type,
        false,
    ))?;
    let is_choice = matches!(
        kind,
        pb::QuestionType::SingleChoice | pb::QuestionType::MultipleChoice
    );
    if !is_choice && !question.choices.is_empty() {
        violations.add(
            format!("{at}.choices"),
            "is only for SINGLE_CHOICE and MULTIPLE_CHOICE questions",
        );
    }
    if kind != pb::QuestionType::Rating && (question.scale_min != 0 || question.scale_max != 0) {
        violations.add(
            format!("{at}.scale_min"),
            "scale_min and scale_max are only for RATING questions",
        );
    }
    Some(match kind {
        pb::QuestionType::Nps => QuestionType::Nps,
        pb::QuestionType::Csat => QuestionType::Csat,
        pb::QuestionType::Ces => QuestionType::Ces,
        pb::QuestionType::FreeText => QuestionType::FreeText,
        pb::QuestionType::Rating => {
            let (min, max) = (question.scale_min, question.scale_max);
            if !(0..=99).contains(&min) {
                violations.add(format!("{at}.scale_min"), "must be between 0 and 99");
                return None;
            }
            if max <= min || max > 100 {
                violations.add(
                    format!("{at}.scale_max"),
                    format!("must be above scale_min ({min}) and at most 100"),
                );
                return None;
            }
            QuestionType::Rating { min, max }
        }
        pb::QuestionType::SingleChoice | pb::QuestionType::MultipleChoice => {
            let field = format!("{at}.choices");
            if !(2..=MAX_CHOICES).contains(&question.choices.len()) {
                violations.add(
                    field,
                    format!(
                        "holds {} choices: 2 to {MAX_CHOICES} are required",
                        question.choices.len()
                    ),
                );
                return None;
            }
            let mut distinct = HashSet::new();
            for (index, choice) in question.choices.iter().enumerate() {
                let at = format!("{field}[{index}]");
                if violations
                    .check(validate::text(&at, choice, true, 200))
                    .is_some()
                    && !distinct.insert(choice.as_str())
                {
                    violations.add(at, format!("'{choice}' is an earlier choice"));
                }
            }
            let choices = question.choices.clone();
            if kind == pb::QuestionType::SingleChoice {
                QuestionType::SingleChoice(choices)
            } else {
                QuestionType::MultipleChoice(choices)
            }
        }
        pb::QuestionType::Unspecified => return None,
    })
}

/// The triggers of a survey, each condition compiled and checked.
pub fn triggers(violations: &mut Violations, field: &str, raw: &[pb::Trigger]) -> Vec<Trigger> {
    if raw.len() > MAX_TRIGGERS {
        violations.add(
            field,
            format!(
                "holds {} triggers, at most {MAX_TRIGGERS} are allowed",
                raw.len()
            ),
        );
    }
    let mut seen = HashSet::new();
    let mut triggers = Vec::new();
    for (index, trigger) in raw.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let name_ok = violations
            .check(identifier(&format!("{at}.name"), &trigger.name))
            .is_some();
        if name_ok && !seen.insert(trigger.name.as_str()) {
            violations.add(
                format!("{at}.name"),
                format!("'{}' is the name of an earlier trigger", trigger.name),
            );
        }
        let source = violations
            .check(validate::enum_value::<pb::TriggerSource>(
                &format!("{at}.source"),
                trigger.source,
                false,
            ))
            .map(|source| match source {
                pb::TriggerSource::Touchpoint => TriggerSource::Touchpoint,
                _ => TriggerSource::Transition,
            });
        let condition_field = format!("{at}.condition");
        let length = trigger.condition.chars().count();
        let condition_ok = if trigger.condition.trim().is_empty() {
            violations.add(condition_field.clone(), "is required");
            false
        } else if length > MAX_CONDITION_CHARS {
            violations.add(
                condition_field.clone(),
                format!("is {length} characters long, at most {MAX_CONDITION_CHARS} are allowed"),
            );
            false
        } else {
            true
        };
        if let (Some(source), true) = (source, condition_ok)
            && let Err(refused) = triggers::compile(source, &trigger.condition)
        {
            violations.check::<()>(Err(FieldViolation::with_reason(
                condition_field,
                refused.reason,
                refused.description,
            )));
        }
        let delay = match &trigger.delay {
            None => Some(Duration::ZERO),
            Some(delay) => {
                violations.check(duration(&format!("{at}.delay"), delay, Duration::ZERO, 365))
            }
        };
        if let (Some(source), Some(delay)) = (source, delay) {
            triggers.push(Trigger {
                name: trigger.name.clone(),
                source,
                condition: trigger.condition.clone(),
                delay,
            });
        }
    }
    triggers
}

/// A fatigue policy (unset: the defaults).
pub fn fatigue(
    violations: &mut Violations,
    field: &str,
    raw: Option<&pb::FatiguePolicy>,
) -> FatiguePolicy {
    let defaults = FatiguePolicy::default();
    let Some(raw) = raw else { return defaults };
    let read = |violations: &mut Violations,
                name: &str,
                value: Option<&prost_types::Duration>,
                default| {
        value.map_or(Some(default), |value| {
            violations.check(duration(
                &format!("{field}.{name}"),
                value,
                Duration::ZERO,
                730,
            ))
        })
    };
    FatiguePolicy {
        min_interval: read(
            violations,
            "min_interval",
            raw.min_interval.as_ref(),
            defaults.min_interval,
        )
        .unwrap_or(defaults.min_interval),
        repeat_interval: read(
            violations,
            "repeat_interval",
            raw.repeat_interval.as_ref(),
            defaults.repeat_interval,
        )
        .unwrap_or(defaults.repeat_interval),
    }
}

/// A response window (unset: 14 days).
pub fn response_window(
    violations: &mut Violations,
    field: &str,
    raw: Option<&prost_types::Duration>,
) -> Duration {
    raw.map_or(DEFAULT_RESPONSE_WINDOW, |raw| {
        violations
            .check(duration(field, raw, Duration::from_secs(DAY), 365))
            .unwrap_or(DEFAULT_RESPONSE_WINDOW)
    })
}

/// A consent purpose (empty: none).
pub fn consent_purpose(violations: &mut Violations, field: &str, raw: &str) -> Option<String> {
    if raw.is_empty() {
        return None;
    }
    violations.check(validate::token(field, raw, 64))?;
    Some(raw.to_owned())
}

/// Checks the rule of a survey's kind: an NPS, CSAT or CES survey holds
/// exactly one question of its type.
pub fn kind_rule(
    violations: &mut Violations,
    field: &str,
    kind: SurveyKind,
    questions: &[Question],
) {
    let Some(headline) = kind.headline() else {
        return;
    };
    let count = questions.iter().filter(|q| q.kind == headline).count();
    if count != 1 {
        violations.check::<()>(Err(FieldViolation::with_reason(
            field,
            "KIND_MISMATCH",
            format!(
                "a {} survey needs exactly one {} question, it has {count}",
                kind.as_str(),
                kind.as_str()
            ),
        )));
    }
}

/// The whole definition of a survey in a create request.
pub fn definition(
    violations: &mut Violations,
    field: &str,
    kind: Option<SurveyKind>,
    raw: &pb::Survey,
) -> SurveyDefinition {
    violations.check(validate::text(
        &format!("{field}.display_name"),
        &raw.display_name,
        true,
        200,
    ));
    violations.check(validate::text(
        &format!("{field}.description"),
        &raw.description,
        false,
        2000,
    ));
    let questions = questions(violations, &format!("{field}.questions"), &raw.questions);
    if let Some(kind) = kind {
        kind_rule(violations, &format!("{field}.questions"), kind, &questions);
    }
    SurveyDefinition {
        display_name: raw.display_name.clone(),
        description: raw.description.clone(),
        questions,
        triggers: triggers(violations, &format!("{field}.triggers"), &raw.triggers),
        fatigue: fatigue(
            violations,
            &format!("{field}.fatigue"),
            raw.fatigue.as_ref(),
        ),
        response_window: response_window(
            violations,
            &format!("{field}.response_window"),
            raw.response_window.as_ref(),
        ),
        consent_purpose: consent_purpose(
            violations,
            &format!("{field}.consent_purpose"),
            &raw.consent_purpose,
        ),
        sampling_percent: sampling_percent(
            violations,
            &format!("{field}.sampling_percent"),
            raw.sampling_percent,
        ),
    }
}

/// A sampling share: 1 to 100 percent, 0 meaning 100.
pub fn sampling_percent(violations: &mut Violations, field: &str, raw: i32) -> u8 {
    match raw {
        0 => 100,
        1..=100 => raw as u8,
        _ => {
            violations.check::<()>(Err(FieldViolation::with_reason(
                field,
                "OUT_OF_RANGE",
                "must be 1 to 100 (percent), or 0 for every event",
            )));
            100
        }
    }
}

/// A caller's response id: 1 to 128 printable ASCII characters.
pub fn response_id(field: &str, raw: &str) -> Result<(), FieldViolation> {
    if raw.is_empty() {
        return Err(FieldViolation::with_reason(
            field,
            "REQUIRED",
            "is required",
        ));
    }
    if raw.len() > 128 || !raw.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err(FieldViolation::with_reason(
            field,
            "INVALID_FORMAT",
            "must be 1 to 128 printable ASCII characters without spaces",
        ));
    }
    Ok(())
}

/// The answers of a response, checked against the questions they answer.
pub fn answers(
    violations: &mut Violations,
    field: &str,
    raw: &[pb::Answer],
    questions: &[Question],
) -> Vec<Answer> {
    if raw.is_empty() {
        violations.add(field, "at least one answer is required");
    } else if raw.len() > MAX_QUESTIONS {
        violations.add(
            field,
            format!(
                "holds {} answers, at most {MAX_QUESTIONS} are allowed",
                raw.len()
            ),
        );
    }
    let mut answered = HashSet::new();
    let mut answers = Vec::new();
    for (index, answer) in raw.iter().enumerate() {
        let at = format!("{field}[{index}]");
        let Some(question) = questions.iter().find(|q| q.id == answer.question_id) else {
            violations.check::<()>(Err(FieldViolation::with_reason(
                format!("{at}.question_id"),
                "UNKNOWN_QUESTION",
                if answer.question_id.is_empty() {
                    "is required".to_owned()
                } else {
                    format!("the survey has no question '{}'", answer.question_id)
                },
            )));
            continue;
        };
        if !answered.insert(question.id.as_str()) {
            violations.add(
                format!("{at}.question_id"),
                format!("question '{}' is answered twice", question.id),
            );
            continue;
        }
        if let Some(value) = answer_value(violations, &at, question, answer.value.as_ref()) {
            answers.push(Answer {
                question_id: question.id.clone(),
                value,
                sentiment: None,
            });
        }
    }
    for question in questions.iter().filter(|q| q.required) {
        if !answered.contains(question.id.as_str()) {
            violations.check::<()>(Err(FieldViolation::with_reason(
                field,
                "REQUIRED",
                format!("question '{}' is required", question.id),
            )));
        }
    }
    answers
}

fn answer_value(
    violations: &mut Violations,
    at: &str,
    question: &Question,
    value: Option<&pb::answer::Value>,
) -> Option<AnswerValue> {
    use pb::answer::Value;
    let expected = match &question.kind {
        QuestionType::Nps
        | QuestionType::Csat
        | QuestionType::Ces
        | QuestionType::Rating { .. } => "score",
        QuestionType::FreeText => "text",
        QuestionType::SingleChoice(_) => "choice",
        QuestionType::MultipleChoice(_) => "choices",
    };
    let wrong = |violations: &mut Violations| {
        violations.check::<()>(Err(FieldViolation::with_reason(
            format!("{at}.{expected}"),
            "WRONG_ANSWER_TYPE",
            format!("question '{}' takes a {expected} answer", question.id),
        )));
        None
    };
    match (value, &question.kind) {
        (Some(Value::Score(score)), kind) if kind.scale().is_some() => {
            let (min, max) = kind.scale().unwrap_or_default();
            if (min..=max).contains(score) {
                Some(AnswerValue::Score(*score))
            } else {
                violations.check::<()>(Err(FieldViolation::with_reason(
                    format!("{at}.score"),
                    "OUT_OF_RANGE",
                    format!("{score} is outside the question's scale {min} to {max}"),
                )));
                None
            }
        }
        (Some(Value::Text(text)), QuestionType::FreeText) => violations
            .check(validate::text(
                &format!("{at}.text"),
                text,
                true,
                MAX_TEXT_CHARS,
            ))
            .map(|()| AnswerValue::Text(Some(text.clone()))),
        (Some(Value::Choice(choice)), QuestionType::SingleChoice(choices)) => {
            if choices.contains(choice) {
                Some(AnswerValue::Choice(choice.clone()))
            } else {
                violations.check::<()>(Err(FieldViolation::with_reason(
                    format!("{at}.choice"),
                    "UNKNOWN_CHOICE",
                    format!("'{choice}' is not one of the question's choices"),
                )));
                None
            }
        }
        (Some(Value::Choices(chosen)), QuestionType::MultipleChoice(choices)) => {
            let field = format!("{at}.choices.values");
            if chosen.values.is_empty() {
                violations.add(field, "at least one choice is required");
                return None;
            }
            let mut distinct = HashSet::new();
            let mut ok = true;
            for (index, value) in chosen.values.iter().enumerate() {
                if !choices.contains(value) {
                    violations.check::<()>(Err(FieldViolation::with_reason(
                        format!("{field}[{index}]"),
                        "UNKNOWN_CHOICE",
                        format!("'{value}' is not one of the question's choices"),
                    )));
                    ok = false;
                } else if !distinct.insert(value.as_str()) {
                    violations.add(
                        format!("{field}[{index}]"),
                        format!("'{value}' is chosen twice"),
                    );
                    ok = false;
                }
            }
            ok.then(|| AnswerValue::Choices(chosen.values.clone()))
        }
        _ => wrong(violations),
    }
}
