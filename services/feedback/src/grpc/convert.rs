//! Domain values in their protobuf form, for answers and the log.

use clm_platform::time::to_timestamp;
use clm_proto::common as common_pb;
use clm_proto::feedback as pb;

use super::requests::to_duration;
use crate::model::{
    Answer, AnswerValue, Dispatch, DispatchState, Question, QuestionType, Response, ScoredAnswer,
    Sentiment, SentimentLabel, SuppressReason, Survey, SurveyKind, SurveyState, TriggerSource,
};
use crate::summary::Tally;

/// A survey kind.
pub fn kind(kind: SurveyKind) -> pb::SurveyKind {
    match kind {
        SurveyKind::Nps => pb::SurveyKind::Nps,
        SurveyKind::Csat => pb::SurveyKind::Csat,
        SurveyKind::Ces => pb::SurveyKind::Ces,
        SurveyKind::Custom => pb::SurveyKind::Custom,
    }
}

/// A survey state.
pub fn state(state: SurveyState) -> pb::SurveyState {
    match state {
        SurveyState::Active => pb::SurveyState::Active,
        SurveyState::Paused => pb::SurveyState::Paused,
        SurveyState::Archived => pb::SurveyState::Archived,
    }
}

/// A question.
pub fn question(question: &Question) -> pb::Question {
    let mut out = pb::Question {
        id: question.id.clone(),
        text: question.text.clone(),
        r#type: question_type(&question.kind) as i32,
        required: question.required,
        ..pb::Question::default()
    };
    match &question.kind {
        QuestionType::Rating { min, max } => {
            out.scale_min = *min;
            out.scale_max = *max;
        }
        QuestionType::SingleChoice(choices) | QuestionType::MultipleChoice(choices) => {
            out.choices = choices.clone();
        }
        _ => {}
    }
    out
}

/// A question type.
pub fn question_type(kind: &QuestionType) -> pb::QuestionType {
    match kind {
        QuestionType::Nps => pb::QuestionType::Nps,
        QuestionType::Csat => pb::QuestionType::Csat,
        QuestionType::Ces => pb::QuestionType::Ces,
        QuestionType::Rating { .. } => pb::QuestionType::Rating,
        QuestionType::SingleChoice(_) => pb::QuestionType::SingleChoice,
        QuestionType::MultipleChoice(_) => pb::QuestionType::MultipleChoice,
        QuestionType::FreeText => pb::QuestionType::FreeText,
    }
}

/// A survey.
pub fn survey(survey: &Survey) -> pb::Survey {
    let definition = &survey.definition;
    pb::Survey {
        id: survey.id.to_string(),
        display_name: definition.display_name.clone(),
        description: definition.description.clone(),
        kind: kind(survey.kind) as i32,
        questions: definition.questions.iter().map(question).collect(),
        triggers: definition
            .triggers
            .iter()
            .map(|trigger| pb::Trigger {
                name: trigger.name.clone(),
                source: match trigger.source {
                    TriggerSource::Transition => pb::TriggerSource::Transition,
                    TriggerSource::Touchpoint => pb::TriggerSource::Touchpoint,
                } as i32,
                condition: trigger.condition.clone(),
                delay: Some(to_duration(trigger.delay)),
            })
            .collect(),
        fatigue: Some(pb::FatiguePolicy {
            min_interval: Some(to_duration(definition.fatigue.min_interval)),
            repeat_interval: Some(to_duration(definition.fatigue.repeat_interval)),
        }),
        response_window: Some(to_duration(definition.response_window)),
        consent_purpose: definition.consent_purpose.clone().unwrap_or_default(),
        state: state(survey.state) as i32,
        create_time: Some(to_timestamp(survey.created_at)),
        update_time: Some(to_timestamp(survey.updated_at)),
        archive_time: survey.archived_at.map(to_timestamp),
        version: survey.version,
        sampling_percent: i32::from(definition.sampling_percent),
    }
}

/// A dispatch state and its suppression reason.
pub fn dispatch_state(state: DispatchState) -> (pb::DispatchState, pb::SuppressReason) {
    match state {
        DispatchState::Scheduled => (
            pb::DispatchState::Scheduled,
            pb::SuppressReason::Unspecified,
        ),
        DispatchState::Dispatched => (
            pb::DispatchState::Dispatched,
            pb::SuppressReason::Unspecified,
        ),
        DispatchState::Responded => (
            pb::DispatchState::Responded,
            pb::SuppressReason::Unspecified,
        ),
        DispatchState::Expired => (pb::DispatchState::Expired, pb::SuppressReason::Unspecified),
        DispatchState::Suppressed(reason) => (
            pb::DispatchState::Suppressed,
            match reason {
                SuppressReason::Fatigue => pb::SuppressReason::Fatigue,
                SuppressReason::NoConsent => pb::SuppressReason::NoConsent,
                SuppressReason::SurveyInactive => pb::SuppressReason::SurveyInactive,
                SuppressReason::CustomerErased => pb::SuppressReason::CustomerErased,
                SuppressReason::Stale => pb::SuppressReason::Stale,
                SuppressReason::Retracted => pb::SuppressReason::Retracted,
            },
        ),
    }
}

/// The dispatch states a filter names (SUPPRESSED stands for every reason).
pub fn dispatch_states_of(state: pb::DispatchState) -> Vec<DispatchState> {
    DispatchState::ALL
        .into_iter()
        .filter(|candidate| dispatch_state(*candidate).0 == state)
        .collect()
}

/// A dispatch.
pub fn dispatch(dispatch: &Dispatch) -> pb::Dispatch {
    let (state, reason) = dispatch_state(dispatch.state);
    pb::Dispatch {
        id: dispatch.id.to_string(),
        survey_id: dispatch.survey_id.to_string(),
        customer_id: dispatch.customer_id.to_string(),
        trigger_name: dispatch.trigger_name.clone(),
        source_entry_id: dispatch.source_entry_id.clone(),
        state: state as i32,
        suppress_reason: reason as i32,
        due_time: Some(to_timestamp(dispatch.due_at)),
        dispatch_time: dispatch.dispatched_at.map(to_timestamp),
        expire_time: dispatch.expires_at.map(to_timestamp),
        respond_time: dispatch.responded_at.map(to_timestamp),
        create_time: Some(to_timestamp(dispatch.created_at)),
    }
}

/// A sentiment.
pub fn sentiment(sentiment: &Sentiment) -> pb::Sentiment {
    pb::Sentiment {
        score: sentiment.score(),
        label: match sentiment.label() {
            SentimentLabel::Positive => pb::SentimentLabel::Positive,
            SentimentLabel::Neutral => pb::SentimentLabel::Neutral,
            SentimentLabel::Negative => pb::SentimentLabel::Negative,
            SentimentLabel::NotScored => pb::SentimentLabel::NotScored,
        } as i32,
        language: sentiment.language().code().to_owned(),
    }
}

fn answer(answer: &Answer) -> pb::Answer {
    use pb::answer::Value;
    pb::Answer {
        question_id: answer.question_id.clone(),
        value: match &answer.value {
            AnswerValue::Score(score) => Some(Value::Score(*score)),
            AnswerValue::Text(Some(text)) => Some(Value::Text(text.clone())),
            AnswerValue::Text(None) => None,
            AnswerValue::Choice(choice) => Some(Value::Choice(choice.clone())),
            AnswerValue::Choices(values) => Some(Value::Choices(pb::Choices {
                values: values.clone(),
            })),
        },
        sentiment: answer.sentiment.as_ref().map(sentiment),
    }
}

/// A response.
pub fn response(response: &Response) -> pb::SurveyResponse {
    pb::SurveyResponse {
        id: response.id.to_string(),
        response_id: response.response_id.clone(),
        survey_id: response.survey_id.to_string(),
        dispatch_id: response
            .dispatch_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        customer: Some(common_pb::CustomerReference {
            reference: Some(common_pb::customer_reference::Reference::CustomerId(
                response.customer_id.to_string(),
            )),
        }),
        customer_id: response.customer_id.to_string(),
        answers: response.answers.iter().map(answer).collect(),
        submit_time: Some(to_timestamp(response.submitted_at)),
        sentiment: response.sentiment.as_ref().map(sentiment),
        record_time: Some(to_timestamp(response.recorded_at)),
        survey_version: response.survey_version,
    }
}

/// A scored answer as the log carries it.
pub fn scored_answer(answer: &ScoredAnswer) -> pb::ScoredAnswer {
    pb::ScoredAnswer {
        question_id: answer.question_id.clone(),
        r#type: question_type(&answer.kind) as i32,
        score: answer.score,
    }
}

/// A summary from a tally.
pub fn summary(survey_id: &str, tally: &Tally) -> pb::GetSurveySummaryResponse {
    let figures = tally.figures();
    pb::GetSurveySummaryResponse {
        survey_id: survey_id.to_owned(),
        dispatch_count: tally.dispatched,
        response_count: tally.responses,
        response_rate: figures.response_rate,
        nps: Some(pb::NpsSummary {
            response_count: tally.nps_count,
            promoter_count: tally.nps_promoters,
            passive_count: tally.nps_passives,
            detractor_count: tally.nps_detractors,
            promoter_fraction: figures.promoter_fraction,
            detractor_fraction: figures.detractor_fraction,
            score: figures.nps,
            score_ci_low: figures.nps_ci.0,
            score_ci_high: figures.nps_ci.1,
        }),
        csat: Some(pb::CsatSummary {
            response_count: tally.csat_count,
            satisfied_count: tally.csat_satisfied,
            satisfied_fraction: figures.csat,
            mean: figures.csat_mean,
            satisfied_fraction_ci_low: figures.csat_ci.0,
            satisfied_fraction_ci_high: figures.csat_ci.1,
        }),
        ces: Some(pb::CesSummary {
            response_count: tally.ces_count,
            mean: figures.ces_mean,
        }),
        sentiment: Some(pb::SentimentSummary {
            positive_count: tally.sentiment_positive,
            neutral_count: tally.sentiment_neutral,
            negative_count: tally.sentiment_negative,
            mean_score: figures.sentiment_mean,
            not_scored_count: tally.sentiment_not_scored,
        }),
    }
}
