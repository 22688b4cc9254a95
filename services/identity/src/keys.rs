//! Identity keys as the service stores and compares them: e-mails trimmed,
//! lower-cased and syntax-checked; phones parsed to E.164; external ids
//! qualified by their source system; anonymous ids as given.

use std::fmt;
use std::str::FromStr;

use clm_platform::FieldViolation;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// The longest identity value accepted, in characters.
pub const MAX_KEY_LENGTH: usize = 320;

/// The kind of an identity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyKind {
    /// An e-mail address.
    Email,
    /// A phone number in E.164 form.
    Phone,
    /// An id in another system, stored as `source:id`.
    External,
    /// An anonymous id (cookie, device).
    Anonymous,
}

impl KeyKind {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Email => "email",
            Self::Phone => "phone",
            Self::External => "external",
            Self::Anonymous => "anonymous",
        }
    }

    /// The kind stored under `name`.
    pub fn from_stored(name: &str) -> Option<Self> {
        match name {
            "email" => Some(Self::Email),
            "phone" => Some(Self::Phone),
            "external" => Some(Self::External),
            "anonymous" => Some(Self::Anonymous),
            _ => None,
        }
    }

    /// True for keys that identify a person (not only a browser or device).
    pub fn identifies_person(self) -> bool {
        !matches!(self, Self::Anonymous)
    }
}

/// A normalised identity key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentityKey {
    /// What kind of key.
    pub kind: KeyKind,
    /// The normalised value (`source:id` for external ids).
    pub value: String,
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only the kind: key values are personal data and never logged.
        write!(f, "{} key", self.kind.as_str())
    }
}

impl IdentityKey {
    /// An external id key.
    pub fn external(source: &str, id: &str) -> Self {
        Self {
            kind: KeyKind::External,
            value: format!("{source}:{id}"),
        }
    }

    /// For an external id key, its (source, id).
    pub fn external_parts(&self) -> Option<(&str, &str)> {
        match self.kind {
            KeyKind::External => self.value.split_once(':'),
            _ => None,
        }
    }
}

/// Normalises identity keys with the server's settings.
#[derive(Clone)]
pub struct KeyNormalizer {
    default_region: Option<phonenumber::country::Id>,
}

impl fmt::Debug for KeyNormalizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyNormalizer")
            .field("default_region", &self.default_region)
            .finish()
    }
}

impl KeyNormalizer {
    /// A normaliser that reads phone numbers without a `+` prefix in
    /// `default_region` (an ISO 3166 code such as "DE"); without one such
    /// numbers are rejected.
    pub fn new(default_region: Option<&str>) -> Result<Self, String> {
        let default_region = default_region
            .map(|code| {
                phonenumber::country::Id::from_str(&code.to_ascii_uppercase())
                    .map_err(|_| format!("{code:?} is not an ISO 3166 region code"))
            })
            .transpose()?;
        Ok(Self { default_region })
    }

    /// A normalised e-mail address.
    pub fn email(&self, field: &str, raw: &str) -> Result<IdentityKey, FieldViolation> {
        let value = raw.trim().to_lowercase();
        if value.is_empty() {
            return Err(FieldViolation::new(field, "is required"));
        }
        if value.chars().count() > MAX_KEY_LENGTH {
            return Err(FieldViolation::new(
                field,
                format!("is longer than {MAX_KEY_LENGTH} characters"),
            ));
        }
        let well_formed = !value.contains(['<', '>', ' ', '\t', '\n', '\r'])
            && email_address::EmailAddress::from_str(&value).is_ok()
            && value.rsplit_once('@').is_some_and(|(_, domain)| {
                domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && !domain.starts_with('[')
            });
        if !well_formed {
            return Err(FieldViolation::new(field, "is not a valid e-mail address"));
        }
        Ok(IdentityKey {
            kind: KeyKind::Email,
            value,
        })
    }

    /// A phone number in E.164 form.
    pub fn phone(&self, field: &str, raw: &str) -> Result<IdentityKey, FieldViolation> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(FieldViolation::new(field, "is required"));
        }
        if trimmed.len() > 64 {
            return Err(FieldViolation::new(field, "is not a valid phone number"));
        }
        if !trimmed.starts_with('+') && !trimmed.starts_with("00") && self.default_region.is_none()
        {
            return Err(FieldViolation::new(
                field,
                "needs an international prefix such as +49 (no default region is configured)",
            ));
        }
        let number = phonenumber::parse(self.default_region, trimmed)
            .map_err(|_| FieldViolation::new(field, "is not a valid phone number"))?;
        if !phonenumber::is_valid(&number) {
            return Err(FieldViolation::new(field, "is not a valid phone number"));
        }
        Ok(IdentityKey {
            kind: KeyKind::Phone,
            value: number.format().mode(phonenumber::Mode::E164).to_string(),
        })
    }

    /// An external id of `source`.
    pub fn external(
        &self,
        field: &str,
        source: &str,
        id: &str,
    ) -> Result<IdentityKey, FieldViolation> {
        clm_platform::validate::token(&format!("{field}.source"), source, 64)?;
        let id = id.trim();
        if id.is_empty() {
            return Err(FieldViolation::new(format!("{field}.id"), "is required"));
        }
        clm_platform::validate::text(&format!("{field}.id"), id, true, MAX_KEY_LENGTH)?;
        Ok(IdentityKey::external(source, id))
    }

    /// An anonymous id.
    pub fn anonymous(&self, field: &str, raw: &str) -> Result<IdentityKey, FieldViolation> {
        let value = raw.trim();
        clm_platform::validate::text(field, value, true, MAX_KEY_LENGTH)?;
        Ok(IdentityKey {
            kind: KeyKind::Anonymous,
            value: value.to_owned(),
        })
    }
}

/// Hashes identity keys for the suppression list with a server secret, so
/// the list cannot be read back into e-mails or phones by guessing.
#[derive(Clone)]
pub struct KeyHasher {
    secret: Vec<u8>,
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyHasher(<secret>)")
    }
}

impl KeyHasher {
    /// A hasher keyed by `secret`.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            secret: secret.to_vec(),
        }
    }

    /// The keyed hash of a normalised key.
    pub fn hash(&self, key: &IdentityKey) -> Vec<u8> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.secret).expect("hmac takes any key length");
        mac.update(key.kind.as_str().as_bytes());
        mac.update(b"\x1f");
        mac.update(key.value.as_bytes());
        mac.finalize().into_bytes().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_lowercased_and_checked() {
        let normalizer = KeyNormalizer::new(None).unwrap();
        assert_eq!(
            normalizer.email("e", "  Ada@Example.COM ").unwrap().value,
            "ada@example.com"
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "Ada <ada@example.com>",
            "a b@example.com",
        ] {
            assert!(normalizer.email("e", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn phones_become_e164() {
        let normalizer = KeyNormalizer::new(Some("DE")).unwrap();
        assert_eq!(
            normalizer.phone("p", "030 901820").unwrap().value,
            "+4930901820"
        );
        assert_eq!(
            normalizer.phone("p", "+1 (415) 555-2671").unwrap().value,
            "+14155552671"
        );
        assert!(normalizer.phone("p", "12").is_err());
        assert!(normalizer.phone("p", "not a phone").is_err());
        let strict = KeyNormalizer::new(None).unwrap();
        assert!(strict.phone("p", "030 901820").is_err());
        assert_eq!(
            strict.phone("p", "+49 30 901820").unwrap().value,
            "+4930901820"
        );
        assert!(KeyNormalizer::new(Some("XX")).is_err());
    }

    #[test]
    fn external_ids_are_qualified_by_source() {
        let normalizer = KeyNormalizer::new(None).unwrap();
        let key = normalizer.external("x", "shopify", "C-1").unwrap();
        assert_eq!(key.value, "shopify:C-1");
        assert_eq!(key.external_parts(), Some(("shopify", "C-1")));
        assert!(normalizer.external("x", "Shop Ify", "1").is_err());
        assert!(normalizer.external("x", "shopify", " ").is_err());
    }

    #[test]
    fn hashes_depend_on_the_secret() {
        let key = IdentityKey {
            kind: KeyKind::Email,
            value: "ada@example.com".into(),
        };
        assert_eq!(
            KeyHasher::new(b"a").hash(&key),
            KeyHasher::new(b"a").hash(&key)
        );
        assert_ne!(
            KeyHasher::new(b"a").hash(&key),
            KeyHasher::new(b"b").hash(&key)
        );
        assert!(!format!("{key}").contains("ada"));
    }
}
