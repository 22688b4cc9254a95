//! The sentiment of free text: VADER (a lexicon and rules made for short
//! English texts, `vader_sentiment`), after the language is detected
//! (`whatlang`). VADER only knows English, so a text in another language is
//! stored as not scored instead of being scored by the few English words it
//! happens to contain.

use crate::model::{Language, Sentiment};

/// The sentiment of `text`.
///
/// - Detected reliably as a language other than English: not scored.
/// - Detected as English (however sure): scored.
/// - Too short or mixed to tell: scored when VADER finds words it knows
///   (a score other than 0), not scored otherwise, since a short text in an
///   unknown language scores 0 for want of words rather than for being
///   neutral. (Short English texts are often taken for Afrikaans or Dutch
///   by the detector, unsure: the lexicon decides those.)
///
/// A scored text's language is "eng"; a text not scored carries the
/// language detected when the detector is sure, else none.
pub fn analyse(text: &str) -> Sentiment {
    let detected = whatlang::detect(text);
    let reliable = detected.as_ref().filter(|info| info.is_reliable());
    if let Some(info) = reliable.filter(|info| info.lang() != whatlang::Lang::Eng) {
        return Sentiment::NotScored {
            language: Language::of_code(info.lang().code()),
        };
    }
    let english = detected
        .as_ref()
        .is_some_and(|info| info.lang() == whatlang::Lang::Eng);
    let score = vader_compound(text);
    if english || score != 0.0 {
        // Scored as English, the one language the analyser reads.
        Sentiment::Scored {
            score,
            language: Language::of_code(whatlang::Lang::Eng.code()),
        }
    } else {
        Sentiment::NotScored {
            language: Language::default(),
        }
    }
}

/// The sentiment of every free-text answer of a response together.
pub fn analyse_all<'a>(texts: impl IntoIterator<Item = &'a str>) -> Option<Sentiment> {
    let joined: Vec<&str> = texts.into_iter().collect();
    if joined.is_empty() {
        return None;
    }
    Some(analyse(&joined.join("\n")))
}

fn vader_compound(text: &str) -> f64 {
    thread_local! {
        static ANALYSER: vader_sentiment::SentimentIntensityAnalyzer<'static> =
            vader_sentiment::SentimentIntensityAnalyzer::new();
    }
    ANALYSER.with(|analyser| {
        analyser
            .polarity_scores(text)
            .get("compound")
            .copied()
            .unwrap_or(0.0)
            .clamp(-1.0, 1.0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::SentimentLabel;

    #[test]
    fn english_is_scored_with_its_label() {
        let happy = analyse("The onboarding was great, thank you so much!");
        assert_eq!(happy.label(), SentimentLabel::Positive, "{happy:?}");
        assert_eq!(happy.language().code(), "eng");
        let sad = analyse("Terrible support, I am very disappointed and angry.");
        assert_eq!(sad.label(), SentimentLabel::Negative, "{sad:?}");
        let plain = analyse("I used the product on a Tuesday afternoon in the office.");
        assert_eq!(plain.label(), SentimentLabel::Neutral, "{plain:?}");
    }

    #[test]
    fn other_languages_are_not_scored() {
        for text in [
            "Der Kundendienst war wirklich sehr freundlich und hat mir schnell geholfen.",
            "El servicio fue excelente y el equipo respondió muy rápido a mis preguntas.",
            "サービスはとても良かったです。ありがとうございました。",
        ] {
            let sentiment = analyse(text);
            assert_eq!(sentiment.label(), SentimentLabel::NotScored, "{text}");
            assert_eq!(sentiment.score(), 0.0);
            assert_ne!(sentiment.language().code(), "eng", "{text}");
        }
    }

    #[test]
    fn answers_are_scored_together_and_none_is_none() {
        assert_eq!(analyse_all([]), None);
        let both = analyse_all(["Great product.", "Awful delivery, really awful."]).unwrap();
        let awful = analyse("Awful delivery, really awful.");
        assert!(both.score() > awful.score(), "{both:?} {awful:?}");
    }
}
