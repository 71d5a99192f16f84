//! API keys and principals. A key's secret is never stored: only its SHA-256,
//! compared in constant time.

use crate::bounds::{check_len, check_model, MAX_ALLOWED_MODELS, MAX_ID_BYTES, MAX_NAME_BYTES};
use crate::error::InvalidArgument;
use crate::pb;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a key is used for; tariffs are chosen by purpose.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    #[default]
    Realtime,
    Batch,
    Playground,
    Platform,
}

impl Purpose {
    pub fn from_pb(field: &str, value: i32) -> Result<Purpose, InvalidArgument> {
        match pb::Purpose::try_from(value) {
            Ok(pb::Purpose::Unspecified) | Ok(pb::Purpose::Realtime) => Ok(Purpose::Realtime),
            Ok(pb::Purpose::Batch) => Ok(Purpose::Batch),
            Ok(pb::Purpose::Playground) => Ok(Purpose::Playground),
            Ok(pb::Purpose::Platform) => Ok(Purpose::Platform),
            Err(_) => Err(InvalidArgument::new(
                field,
                format!("unknown purpose {value}"),
            )),
        }
    }

    pub fn to_pb(self) -> pb::Purpose {
        match self {
            Purpose::Realtime => pb::Purpose::Realtime,
            Purpose::Batch => pb::Purpose::Batch,
            Purpose::Playground => pb::Purpose::Playground,
            Purpose::Platform => pb::Purpose::Platform,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Realtime => "realtime",
            Purpose::Batch => "batch",
            Purpose::Playground => "playground",
            Purpose::Platform => "platform",
        }
    }
}

/// SHA-256 of an API key's secret.
#[derive(
    Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct KeyHash(#[serde(with = "hex_bytes")] pub [u8; 32]);

impl KeyHash {
    pub fn of_secret(secret: &str) -> KeyHash {
        KeyHash(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn from_slice(field: &str, bytes: &[u8]) -> Result<KeyHash, InvalidArgument> {
        let array: [u8; 32] = bytes
            .try_into()
            .map_err(|_| InvalidArgument::new(field, "must be 32 bytes (SHA-256)"))?;
        Ok(KeyHash(array))
    }

    /// Constant-time comparison: how long it takes says nothing about where
    /// two hashes differ.
    pub fn ct_eq(&self, other: &KeyHash) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl std::fmt::Debug for KeyHash {
    // Only a prefix: enough to correlate, never the whole hash.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyHash({}…)", &self.to_hex()[..8])
    }
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        let bytes = hex::decode(text).map_err(serde::de::Error::custom)?;
        bytes
            .try_into()
            .map_err(|_| serde::de::Error::custom("key hash must be 32 bytes"))
    }
}

/// Ids of accounts and keys: 1 to [`MAX_ID_BYTES`] of `[A-Za-z0-9._-]`.
pub fn validate_id(field: &str, id: &str) -> Result<(), InvalidArgument> {
    if id.is_empty() || id.len() > MAX_ID_BYTES {
        return Err(InvalidArgument::new(
            field,
            format!("must be 1 to {MAX_ID_BYTES} characters"),
        ));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(InvalidArgument::new(
            field,
            "may only hold letters, digits, '-', '_' and '.'",
        ));
    }
    Ok(())
}

/// A free-text name of an account or a key: at most [`MAX_NAME_BYTES`].
pub fn validate_name(field: &str, name: &str) -> Result<(), InvalidArgument> {
    check_len(field, name, MAX_NAME_BYTES)
}

/// A key's `allowed_models`: at most [`MAX_ALLOWED_MODELS`] model names.
pub fn validate_allowed_models(field: &str, models: &[String]) -> Result<(), InvalidArgument> {
    crate::bounds::check_count(field, models.len(), MAX_ALLOWED_MODELS)?;
    for (i, model) in models.iter().enumerate() {
        check_model(&format!("{field}[{i}]"), model)?;
    }
    Ok(())
}

/// Who pays for a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Principal {
    pub account_id: String,
    pub key_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_secret_same_hash_other_secret_other_hash() {
        let a = KeyHash::of_secret("sk-allot-abc");
        assert!(a.ct_eq(&KeyHash::of_secret("sk-allot-abc")));
        assert!(!a.ct_eq(&KeyHash::of_secret("sk-allot-abd")));
    }

    #[test]
    fn debug_never_prints_the_whole_hash() {
        let hash = KeyHash::of_secret("secret");
        assert!(!format!("{hash:?}").contains(&hash.to_hex()));
    }

    #[test]
    fn unspecified_purpose_means_realtime() {
        assert_eq!(Purpose::from_pb("purpose", 0).unwrap(), Purpose::Realtime);
        assert_eq!(
            Purpose::from_pb("purpose", 99).unwrap_err().field,
            "purpose"
        );
    }

    #[test]
    fn ids_are_checked() {
        assert!(validate_id("key_id", "team-a.key_1").is_ok());
        assert_eq!(validate_id("key_id", "").unwrap_err().field, "key_id");
        assert!(validate_id("key_id", "a/b").is_err());
    }

    #[test]
    fn names_and_allowed_models_are_bounded() {
        assert!(validate_name("name", &"n".repeat(MAX_NAME_BYTES)).is_ok());
        assert_eq!(
            validate_name("name", &"n".repeat(MAX_NAME_BYTES + 1))
                .unwrap_err()
                .to_string(),
            "invalid name: must be at most 256 bytes"
        );
        let mut models = vec!["m".to_string(); 4];
        models[3] = "m".repeat(300);
        assert_eq!(
            validate_allowed_models("allowed_models", &models)
                .unwrap_err()
                .field,
            "allowed_models[3]"
        );
        let many = vec!["m".to_string(); MAX_ALLOWED_MODELS + 1];
        assert_eq!(
            validate_allowed_models("allowed_models", &many)
                .unwrap_err()
                .field,
            "allowed_models"
        );
    }
}
