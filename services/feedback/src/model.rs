//! The feedback domain: surveys with their questions, triggers and limits;
//! responses with their answers and sentiment; the figures of a summary.
//! No protobuf and no SQL here: `grpc` converts, `store` keeps.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a survey measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SurveyKind {
    /// Net Promoter Score: exactly one NPS question.
    Nps,
    /// Customer satisfaction: exactly one CSAT question.
    Csat,
    /// Customer effort: exactly one CES question.
    Ces,
    /// Any questions, no headline score.
    Custom,
}

impl SurveyKind {
    /// The question type a survey of this kind holds exactly once.
    pub fn headline(self) -> Option<QuestionType> {
        match self {
            Self::Nps => Some(QuestionType::Nps),
            Self::Csat => Some(QuestionType::Csat),
            Self::Ces => Some(QuestionType::Ces),
            Self::Custom => None,
        }
    }

    /// Its stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nps => "NPS",
            Self::Csat => "CSAT",
            Self::Ces => "CES",
            Self::Custom => "CUSTOM",
        }
    }

    /// The kind of a stored name.
    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Nps, Self::Csat, Self::Ces, Self::Custom]
            .into_iter()
            .find(|kind| kind.as_str() == raw)
    }
}

/// The kind of answer a question takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuestionType {
    /// A score 0 to 10.
    Nps,
    /// A score 1 to 5.
    Csat,
    /// A score 1 to 7.
    Ces,
    /// A score on the question's own scale.
    Rating {
        /// The lowest score.
        min: i32,
        /// The highest score.
        max: i32,
    },
    /// Exactly one of the choices.
    SingleChoice(Vec<String>),
    /// One or more of the choices.
    MultipleChoice(Vec<String>),
    /// Free text.
    FreeText,
}

impl QuestionType {
    /// The scores the question accepts, for a scored question.
    pub fn scale(&self) -> Option<(i32, i32)> {
        match self {
            Self::Nps => Some((0, 10)),
            Self::Csat => Some((1, 5)),
            Self::Ces => Some((1, 7)),
            Self::Rating { min, max } => Some((*min, *max)),
            _ => None,
        }
    }

    /// The choices of a choice question.
    pub fn choices(&self) -> Option<&[String]> {
        match self {
            Self::SingleChoice(choices) | Self::MultipleChoice(choices) => Some(choices),
            _ => None,
        }
    }
}

/// The longest free-text answer, in characters.
pub const MAX_TEXT_CHARS: usize = 5000;

/// One question of a survey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Question {
    /// Unique within the survey; answers refer to it.
    pub id: String,
    /// As shown to the customer.
    pub text: String,
    /// The kind of answer.
    pub kind: QuestionType,
    /// Whether every response must answer it.
    pub required: bool,
}

/// Which log a trigger listens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TriggerSource {
    /// Scoring's transition log.
    Transition,
    /// The touchpoint log.
    Touchpoint,
}

/// When to dispatch a survey.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    /// Unique within the survey.
    pub name: String,
    /// The log whose events are matched.
    pub source: TriggerSource,
    /// The CEL condition, checked when the survey was stored.
    pub condition: String,
    /// How long after the event the survey is due.
    pub delay: Duration,
}

/// How often one customer may be surveyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FatiguePolicy {
    /// Since the customer's last dispatch of any survey (zero: no limit).
    pub min_interval: Duration,
    /// Between two dispatches of this survey to one customer (zero: no limit).
    pub repeat_interval: Duration,
}

impl Default for FatiguePolicy {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(14 * 86_400),
            repeat_interval: Duration::from_secs(90 * 86_400),
        }
    }
}

/// The default response window: 14 days.
pub const DEFAULT_RESPONSE_WINDOW: Duration = Duration::from_secs(14 * 86_400);

/// Where a survey stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SurveyState {
    /// Triggers live, responses accepted.
    Active,
    /// Triggers off; responses to earlier dispatches accepted.
    Paused,
    /// Retired for good.
    Archived,
}

impl SurveyState {
    /// Its stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "ACTIVE",
            Self::Paused => "PAUSED",
            Self::Archived => "ARCHIVED",
        }
    }

    /// The state of a stored name.
    pub fn parse(raw: &str) -> Option<Self> {
        [Self::Active, Self::Paused, Self::Archived]
            .into_iter()
            .find(|state| state.as_str() == raw)
    }
}

/// What a caller defines of a survey (everything but ids, times, state and
/// version). Stored as one JSON document per survey version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SurveyDefinition {
    /// Its name.
    pub display_name: String,
    /// What it is for.
    pub description: String,
    /// The questions, in the order shown.
    pub questions: Vec<Question>,
    /// Any of them schedules a dispatch.
    pub triggers: Vec<Trigger>,
    /// Fatigue limits.
    pub fatigue: FatiguePolicy,
    /// How long after dispatch a response is accepted.
    pub response_window: Duration,
    /// The consent purpose a dispatch needs, when set.
    pub consent_purpose: Option<String>,
    /// The share of matching events that schedule a dispatch, 1 to 100
    /// percent, decided per customer (the same customer is always in or
    /// out of a survey's sample).
    #[serde(default = "all_of_them")]
    pub sampling_percent: u8,
}

fn all_of_them() -> u8 {
    100
}

impl SurveyDefinition {
    /// Whether `customer_id` is in the survey's sample: a hash of the
    /// survey and the customer, so a retry or a replay decides the same.
    pub fn samples(&self, survey_id: Uuid, customer_id: Uuid) -> bool {
        if self.sampling_percent >= 100 {
            return true;
        }
        let hash = survey_id
            .as_bytes()
            .iter()
            .chain(customer_id.as_bytes())
            .fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
                (hash ^ u64::from(*byte)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        hash % 100 < u64::from(self.sampling_percent)
    }
}

/// A stored survey.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survey {
    /// Its id, a UUIDv7.
    pub id: Uuid,
    /// What it measures; never changes.
    pub kind: SurveyKind,
    /// What the caller defined.
    pub definition: SurveyDefinition,
    /// Active, paused or archived.
    pub state: SurveyState,
    /// Incremented on every change.
    pub version: i64,
    /// The version whose questions are current: responses recorded now
    /// answer these.
    pub questions_version: i64,
    /// When it was created.
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    pub updated_at: DateTime<Utc>,
    /// When it was archived.
    pub archived_at: Option<DateTime<Utc>>,
}

/// The value of one answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AnswerValue {
    /// For scored questions.
    Score(i32),
    /// For free-text questions; `None` once the customer was erased.
    Text(Option<String>),
    /// For single-choice questions.
    Choice(String),
    /// For multiple-choice questions.
    Choices(Vec<String>),
}

/// The sentiment of a text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Sentiment {
    /// Scored: the compound score -1 to 1.
    Scored {
        /// The score.
        score: f64,
        /// The detected language, ISO 639-3 (empty when unsure).
        language: Language,
    },
    /// In a language the analyser does not handle.
    NotScored {
        /// The detected language.
        language: Language,
    },
}

/// An ISO 639-3 code, or empty (three ASCII letters at most).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Language(pub [u8; 3]);

impl Language {
    /// The code of a detected language.
    pub fn of_code(code: &str) -> Self {
        let mut bytes = [0u8; 3];
        for (slot, byte) in bytes.iter_mut().zip(code.bytes()) {
            *slot = byte;
        }
        Self(bytes)
    }

    /// The code, or "" when unknown.
    pub fn code(&self) -> &str {
        let end = self.0.iter().position(|b| *b == 0).unwrap_or(3);
        std::str::from_utf8(&self.0[..end]).unwrap_or("")
    }
}

/// The label of a sentiment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SentimentLabel {
    /// At or below -0.05.
    Negative,
    /// Between.
    Neutral,
    /// At or above 0.05.
    Positive,
    /// Not scored.
    NotScored,
}

impl Sentiment {
    /// Its label.
    pub fn label(&self) -> SentimentLabel {
        match *self {
            Self::NotScored { .. } => SentimentLabel::NotScored,
            Self::Scored { score, .. } if score >= 0.05 => SentimentLabel::Positive,
            Self::Scored { score, .. } if score <= -0.05 => SentimentLabel::Negative,
            Self::Scored { .. } => SentimentLabel::Neutral,
        }
    }

    /// The score (0 when not scored).
    pub fn score(&self) -> f64 {
        match *self {
            Self::Scored { score, .. } => score,
            Self::NotScored { .. } => 0.0,
        }
    }

    /// The detected language.
    pub fn language(&self) -> Language {
        match *self {
            Self::Scored { language, .. } | Self::NotScored { language } => language,
        }
    }
}

/// The answer to one question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The question.
    pub question_id: String,
    /// The answer.
    pub value: AnswerValue,
    /// For free text, its sentiment.
    pub sentiment: Option<Sentiment>,
}

/// A scored answer with the type of its question, as counted in summaries
/// and carried on the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoredAnswer {
    /// The question.
    pub question_id: String,
    /// Its type.
    pub kind: QuestionType,
    /// The score.
    pub score: i32,
}

/// A stored response.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    /// The server's id, a UUIDv7.
    pub id: Uuid,
    /// The caller's id, unique across surveys.
    pub response_id: String,
    /// The survey.
    pub survey_id: Uuid,
    /// The survey version whose questions it answered.
    pub survey_version: i64,
    /// The dispatch answered, if any.
    pub dispatch_id: Option<Uuid>,
    /// Who responded.
    pub customer_id: Uuid,
    /// The answers.
    pub answers: Vec<Answer>,
    /// When the customer answered.
    pub submitted_at: DateTime<Utc>,
    /// The sentiment of all free text together.
    pub sentiment: Option<Sentiment>,
    /// When it was stored.
    pub recorded_at: DateTime<Utc>,
}

impl Response {
    /// The answers with a score, typed by the questions they answered.
    pub fn scored_answers(&self, questions: &[Question]) -> Vec<ScoredAnswer> {
        self.answers
            .iter()
            .filter_map(|answer| {
                let AnswerValue::Score(score) = answer.value else {
                    return None;
                };
                let question = questions.iter().find(|q| q.id == answer.question_id)?;
                Some(ScoredAnswer {
                    question_id: answer.question_id.clone(),
                    kind: question.kind.clone(),
                    score,
                })
            })
            .collect()
    }
}

/// Where a dispatch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchState {
    /// Waiting for its due time.
    Scheduled,
    /// Released for delivery.
    Dispatched,
    /// Not released.
    Suppressed(SuppressReason),
    /// Answered.
    Responded,
    /// Not answered within the window.
    Expired,
}

/// Why a dispatch was suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuppressReason {
    /// Surveyed too recently.
    Fatigue,
    /// Consent for the survey's purpose missing.
    NoConsent,
    /// The survey was paused or archived.
    SurveyInactive,
    /// The customer was erased.
    CustomerErased,
    /// Due past the response window already when seen.
    Stale,
    /// The transition that matched was retracted by scoring.
    Retracted,
}

impl DispatchState {
    /// Its stored name (and the reason's, for a suppression).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "SCHEDULED",
            Self::Dispatched => "DISPATCHED",
            Self::Suppressed(SuppressReason::Fatigue) => "SUPPRESSED_FATIGUE",
            Self::Suppressed(SuppressReason::NoConsent) => "SUPPRESSED_NO_CONSENT",
            Self::Suppressed(SuppressReason::SurveyInactive) => "SUPPRESSED_SURVEY_INACTIVE",
            Self::Suppressed(SuppressReason::CustomerErased) => "SUPPRESSED_CUSTOMER_ERASED",
            Self::Suppressed(SuppressReason::Stale) => "SUPPRESSED_STALE",
            Self::Suppressed(SuppressReason::Retracted) => "SUPPRESSED_RETRACTED",
            Self::Responded => "RESPONDED",
            Self::Expired => "EXPIRED",
        }
    }

    /// Every state.
    pub const ALL: [DispatchState; 10] = [
        Self::Scheduled,
        Self::Dispatched,
        Self::Suppressed(SuppressReason::Fatigue),
        Self::Suppressed(SuppressReason::NoConsent),
        Self::Suppressed(SuppressReason::SurveyInactive),
        Self::Suppressed(SuppressReason::CustomerErased),
        Self::Suppressed(SuppressReason::Stale),
        Self::Suppressed(SuppressReason::Retracted),
        Self::Responded,
        Self::Expired,
    ];

    /// The state of a stored name.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == raw)
    }
}

/// One planned sending of a survey to a customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    /// Its id, a UUIDv7.
    pub id: Uuid,
    /// The survey.
    pub survey_id: Uuid,
    /// The customer.
    pub customer_id: Uuid,
    /// The trigger that matched.
    pub trigger_name: String,
    /// The log entry that matched.
    pub source_entry_id: String,
    /// Where it stands.
    pub state: DispatchState,
    /// When it is due.
    pub due_at: DateTime<Utc>,
    /// When it was released.
    pub dispatched_at: Option<DateTime<Utc>>,
    /// When a response stops being accepted.
    pub expires_at: Option<DateTime<Utc>>,
    /// When it was answered.
    pub responded_at: Option<DateTime<Utc>>,
    /// When it was scheduled.
    pub created_at: DateTime<Utc>,
}

/// A page of surveys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurveyQuery {
    /// Only these states.
    pub states: Vec<SurveyState>,
    /// Only this kind.
    pub kind: Option<SurveyKind>,
    /// After this survey id (ids are UUIDv7: creation order).
    pub after: Option<Uuid>,
    /// At most this many.
    pub limit: u32,
}

/// A page of dispatches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchQuery {
    /// Only this survey.
    pub survey_id: Option<Uuid>,
    /// Only this customer.
    pub customer_id: Option<Uuid>,
    /// Only these states (empty: all).
    pub states: Vec<DispatchState>,
    /// Due at or after.
    pub start: Option<DateTime<Utc>>,
    /// Due before.
    pub end: Option<DateTime<Utc>>,
    /// After this (due time, id).
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// At most this many.
    pub limit: u32,
}

/// A page of responses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseQuery {
    /// Only this survey.
    pub survey_id: Option<Uuid>,
    /// Only this customer.
    pub customer_id: Option<Uuid>,
    /// Submitted at or after.
    pub start: Option<DateTime<Utc>>,
    /// Submitted before.
    pub end: Option<DateTime<Utc>>,
    /// Before this (submit time, id): the page goes newest first.
    pub before: Option<(DateTime<Utc>, Uuid)>,
    /// At most this many.
    pub limit: u32,
}

/// A customer's lifecycle as the transition log last told it.
#[derive(Debug, Clone, PartialEq)]
pub struct Lifecycle {
    /// The stage name without prefix ('' when unspecified).
    pub stage: String,
    /// The acquisition status name.
    pub acquisition_status: String,
    /// The health name.
    pub health: String,
    /// 0 to 100.
    pub engagement_score: f64,
    /// 0 to 100.
    pub lead_score: f64,
    /// 0 to 100.
    pub health_score: f64,
    /// The time of the transition that told it.
    pub as_of: DateTime<Utc>,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            stage: String::new(),
            acquisition_status: String::new(),
            health: String::new(),
            engagement_score: 0.0,
            lead_score: 0.0,
            health_score: 0.0,
            as_of: DateTime::<Utc>::UNIX_EPOCH,
        }
    }
}

/// What identity's log asks of the feedback store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CustomerChange {
    /// `merged_id` was merged into `survivor_id`: its dispatches and
    /// responses belong to the survivor from now on.
    Merged {
        /// The customer merged away.
        merged_id: Uuid,
        /// The customer that remains.
        survivor_id: Uuid,
        /// When.
        at: DateTime<Utc>,
    },
    /// The customer was erased: scheduled dispatches are suppressed and the
    /// free text of responses deleted.
    Erased {
        /// The customer.
        customer_id: Uuid,
        /// When.
        at: DateTime<Utc>,
    },
}

/// What became of a customer identity told of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Merged into this survivor.
    Merged(Uuid),
    /// Erased.
    Erased,
}
