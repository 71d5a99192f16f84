//! The one validation error of the domain: a field and what is wrong with it.

/// Input that cannot be accepted. `field` names the offending field as the
/// caller spelled it (for gRPC, the proto field path).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {message}")]
pub struct InvalidArgument {
    pub field: String,
    pub message: String,
}

impl InvalidArgument {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error, with `prefix.` before the field name.
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = format!("{prefix}.{}", self.field);
        self
    }
}
