//! Summary figures. A response contributes a [`Tally`] of counts and sums;
//! tallies add up, so the store keeps them per survey and hour as responses
//! arrive (rollups), and a summary over any window is the sum of the hours
//! inside it plus the responses of the partial hours at its edges, never a
//! scan of every response.

use crate::model::{QuestionType, Response, Sentiment, SentimentLabel};

/// Additive counts and sums of a set of responses and dispatches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Tally {
    /// Responses.
    pub responses: i64,
    /// NPS answers, and of them promoters (9–10), passives (7–8) and
    /// detractors (0–6).
    pub nps_count: i64,
    /// Answers of 9 or 10.
    pub nps_promoters: i64,
    /// Answers of 7 or 8.
    pub nps_passives: i64,
    /// Answers of 0 to 6.
    pub nps_detractors: i64,
    /// CSAT answers.
    pub csat_count: i64,
    /// CSAT answers of 4 or 5.
    pub csat_satisfied: i64,
    /// The sum of CSAT answers.
    pub csat_sum: i64,
    /// CES answers.
    pub ces_count: i64,
    /// The sum of CES answers.
    pub ces_sum: i64,
    /// Responses with a positive sentiment.
    pub sentiment_positive: i64,
    /// Responses with a neutral sentiment.
    pub sentiment_neutral: i64,
    /// Responses with a negative sentiment.
    pub sentiment_negative: i64,
    /// Responses whose free text was not scored.
    pub sentiment_not_scored: i64,
    /// The sum of the scored responses' sentiment scores.
    pub sentiment_sum: f64,
    /// Dispatches released.
    pub dispatched: i64,
    /// Of the dispatches released, those answered so far.
    pub answered: i64,
}

/// The columns of a tally, in [`Tally::to_columns`] order, as the stores
/// name them.
pub const TALLY_COLUMNS: [&str; 17] = [
    "responses",
    "nps_count",
    "nps_promoters",
    "nps_passives",
    "nps_detractors",
    "csat_count",
    "csat_satisfied",
    "csat_sum",
    "ces_count",
    "ces_sum",
    "sentiment_positive",
    "sentiment_neutral",
    "sentiment_negative",
    "sentiment_not_scored",
    "sentiment_sum",
    "dispatched",
    "answered",
];

/// `part(column)` for every tally column, in [`TALLY_COLUMNS`] order,
/// joined by commas: a select or set list of the stores' statements.
pub fn column_list(part: impl Fn(&str) -> String) -> String {
    TALLY_COLUMNS
        .iter()
        .map(|column| part(column))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Tally {
    /// What one response adds: every NPS, CSAT and CES answer it holds,
    /// typed by the questions it answered.
    pub fn of_response(response: &Response, questions: &[crate::model::Question]) -> Self {
        let mut tally = Self {
            responses: 1,
            ..Self::default()
        };
        for answer in response.scored_answers(questions) {
            let score = i64::from(answer.score);
            match answer.kind {
                QuestionType::Nps => {
                    tally.nps_count += 1;
                    match answer.score {
                        9..=10 => tally.nps_promoters += 1,
                        7..=8 => tally.nps_passives += 1,
                        _ => tally.nps_detractors += 1,
                    }
                }
                QuestionType::Csat => {
                    tally.csat_count += 1;
                    tally.csat_sum += score;
                    if answer.score >= 4 {
                        tally.csat_satisfied += 1;
                    }
                }
                QuestionType::Ces => {
                    tally.ces_count += 1;
                    tally.ces_sum += score;
                }
                _ => {}
            }
        }
        if let Some(sentiment) = response.sentiment {
            tally.add_sentiment(&sentiment);
        }
        tally
    }

    fn add_sentiment(&mut self, sentiment: &Sentiment) {
        match sentiment.label() {
            SentimentLabel::Positive => self.sentiment_positive += 1,
            SentimentLabel::Neutral => self.sentiment_neutral += 1,
            SentimentLabel::Negative => self.sentiment_negative += 1,
            SentimentLabel::NotScored => self.sentiment_not_scored += 1,
        }
        if sentiment.label() != SentimentLabel::NotScored {
            self.sentiment_sum += sentiment.score();
        }
    }

    /// The sum of two tallies.
    pub fn plus(mut self, other: &Tally) -> Self {
        let mut columns = self.to_columns();
        for (mine, theirs) in columns.iter_mut().zip(other.to_columns()) {
            *mine += theirs;
        }
        self = Self::from_columns(&columns);
        self
    }

    /// The tally as numbers in [`TALLY_COLUMNS`] order.
    pub fn to_columns(&self) -> [f64; 17] {
        [
            self.responses as f64,
            self.nps_count as f64,
            self.nps_promoters as f64,
            self.nps_passives as f64,
            self.nps_detractors as f64,
            self.csat_count as f64,
            self.csat_satisfied as f64,
            self.csat_sum as f64,
            self.ces_count as f64,
            self.ces_sum as f64,
            self.sentiment_positive as f64,
            self.sentiment_neutral as f64,
            self.sentiment_negative as f64,
            self.sentiment_not_scored as f64,
            self.sentiment_sum,
            self.dispatched as f64,
            self.answered as f64,
        ]
    }

    /// A tally from numbers in [`TALLY_COLUMNS`] order (counts are whole).
    pub fn from_columns(columns: &[f64; 17]) -> Self {
        let count = |index: usize| columns[index].round() as i64;
        Self {
            responses: count(0),
            nps_count: count(1),
            nps_promoters: count(2),
            nps_passives: count(3),
            nps_detractors: count(4),
            csat_count: count(5),
            csat_satisfied: count(6),
            csat_sum: count(7),
            ces_count: count(8),
            ces_sum: count(9),
            sentiment_positive: count(10),
            sentiment_neutral: count(11),
            sentiment_negative: count(12),
            sentiment_not_scored: count(13),
            sentiment_sum: columns[14],
            dispatched: count(15),
            answered: count(16),
        }
    }

    /// The figures of a summary.
    pub fn figures(&self) -> Figures {
        let share = |part: i64, whole: i64| {
            if whole == 0 {
                0.0
            } else {
                part as f64 / whole as f64
            }
        };
        let promoters = share(self.nps_promoters, self.nps_count);
        let detractors = share(self.nps_detractors, self.nps_count);
        let nps = 100.0 * (promoters - detractors);
        let nps_ci = if self.nps_count == 0 {
            (0.0, 0.0)
        } else {
            // The score is the mean of +1 (promoter), 0 and -1 (detractor)
            // over n answers: its variance is (p + d - (p - d)²) / n.
            let n = self.nps_count as f64;
            let variance = (promoters + detractors - (promoters - detractors).powi(2)) / n;
            let half = 100.0 * Z95 * variance.max(0.0).sqrt();
            ((nps - half).max(-100.0), (nps + half).min(100.0))
        };
        let satisfied = share(self.csat_satisfied, self.csat_count);
        let scored_sentiments =
            self.sentiment_positive + self.sentiment_neutral + self.sentiment_negative;
        Figures {
            nps,
            nps_ci,
            promoter_fraction: promoters,
            detractor_fraction: detractors,
            csat: satisfied,
            csat_ci: wilson(self.csat_satisfied, self.csat_count),
            csat_mean: mean(self.csat_sum, self.csat_count),
            ces_mean: mean(self.ces_sum, self.ces_count),
            response_rate: share(self.answered, self.dispatched),
            sentiment_mean: if scored_sentiments == 0 {
                0.0
            } else {
                self.sentiment_sum / scored_sentiments as f64
            },
        }
    }
}

/// The two-sided 95 % quantile of the standard normal distribution.
const Z95: f64 = 1.959_963_984_540_054;

fn mean(sum: i64, count: i64) -> f64 {
    if count == 0 {
        0.0
    } else {
        sum as f64 / count as f64
    }
}

/// The 95 % Wilson score interval of `successes` out of `n`.
fn wilson(successes: i64, n: i64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 0.0);
    }
    let n = n as f64;
    let p = successes as f64 / n;
    let z2 = Z95 * Z95;
    let centre = (p + z2 / (2.0 * n)) / (1.0 + z2 / n);
    let half = Z95 / (1.0 + z2 / n) * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// What a summary reports beyond the counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    /// The Net Promoter Score, -100 to 100.
    pub nps: f64,
    /// Its 95 % confidence interval.
    pub nps_ci: (f64, f64),
    /// Promoters / NPS answers.
    pub promoter_fraction: f64,
    /// Detractors / NPS answers.
    pub detractor_fraction: f64,
    /// Satisfied / CSAT answers.
    pub csat: f64,
    /// Its 95 % Wilson interval.
    pub csat_ci: (f64, f64),
    /// The mean CSAT answer.
    pub csat_mean: f64,
    /// The mean CES answer.
    pub ces_mean: f64,
    /// Answered / released dispatches.
    pub response_rate: f64,
    /// The mean score of scored sentiments.
    pub sentiment_mean: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nps(promoters: i64, passives: i64, detractors: i64) -> Tally {
        Tally {
            nps_count: promoters + passives + detractors,
            nps_promoters: promoters,
            nps_passives: passives,
            nps_detractors: detractors,
            ..Tally::default()
        }
    }

    #[test]
    fn the_nps_interval_matches_the_trinomial_variance() {
        // 50 promoters, 30 passives, 20 detractors: NPS 30; the variance of
        // the ±1/0 scores is 0.5 + 0.2 - 0.09 = 0.61, over 100 answers.
        let figures = nps(50, 30, 20).figures();
        assert!((figures.nps - 30.0).abs() < 1e-9);
        let half = 100.0 * Z95 * (0.61_f64 / 100.0).sqrt();
        assert!((figures.nps_ci.0 - (30.0 - half)).abs() < 1e-9);
        assert!((figures.nps_ci.1 - (30.0 + half)).abs() < 1e-9);
        // All promoters: no spread, and clipped at 100.
        let all = nps(10, 0, 0).figures();
        assert_eq!((all.nps, all.nps_ci), (100.0, (100.0, 100.0)));
        assert_eq!(Tally::default().figures().nps_ci, (0.0, 0.0));
    }

    #[test]
    fn the_csat_interval_is_wilsons() {
        // 8 of 10 satisfied: the Wilson interval is about [0.490, 0.943].
        let tally = Tally {
            csat_count: 10,
            csat_satisfied: 8,
            csat_sum: 42,
            ..Tally::default()
        };
        let figures = tally.figures();
        assert!((figures.csat - 0.8).abs() < 1e-12);
        assert!((figures.csat_ci.0 - 0.4902).abs() < 1e-3, "{figures:?}");
        assert!((figures.csat_ci.1 - 0.9433).abs() < 1e-3, "{figures:?}");
        assert!((figures.csat_mean - 4.2).abs() < 1e-12);
    }

    #[test]
    fn tallies_add_column_by_column() {
        let a = Tally {
            responses: 2,
            sentiment_sum: 0.5,
            dispatched: 3,
            ..nps(1, 1, 0)
        };
        let b = Tally {
            responses: 1,
            sentiment_sum: -0.25,
            answered: 1,
            ..nps(0, 0, 1)
        };
        let sum = a.plus(&b);
        assert_eq!(sum.responses, 3);
        assert_eq!(sum.nps_count, 3);
        assert_eq!(sum.nps_detractors, 1);
        assert_eq!(sum.dispatched, 3);
        assert_eq!(sum.answered, 1);
        assert!((sum.sentiment_sum - 0.25).abs() < 1e-12);
        assert_eq!(Tally::from_columns(&sum.to_columns()), sum);
    }
}
