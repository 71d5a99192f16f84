//! The coordinator's errors, mapped to gRPC status codes in one place:
//! the engine's, the `Admin` service's and the `Placement` service's.
//! Every message that blames a request field starts with that field's
//! name.

use crate::engine::EngineError;
use crate::ledger::LedgerError;
use crate::placement::PlacementError;
use allot::InvalidArgument;
use tonic::Status;

/// What an `Admin` call can fail with before or besides the engine.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// A request field that cannot be accepted.
    #[error("{}: {}", .0.field, .0.message)]
    Invalid(#[from] InvalidArgument),
    #[error(
        "usage analytics are not kept by this coordinator: set usage_postgres_url (or use the \
         embedded store)"
    )]
    NoUsageStore,
    /// The usage store did not answer; retrying may help.
    #[error("usage store: {0}")]
    UsageStore(String),
}

impl AdminError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> AdminError {
        AdminError::Invalid(InvalidArgument::new(field, message))
    }

    pub fn usage_store(error: impl std::fmt::Display) -> AdminError {
        AdminError::UsageStore(error.to_string())
    }
}

impl From<AdminError> for Status {
    fn from(error: AdminError) -> Status {
        match error {
            AdminError::Invalid(invalid) => invalid_argument(invalid),
            AdminError::NoUsageStore => Status::failed_precondition(error.to_string()),
            AdminError::UsageStore(_) => Status::unavailable(error.to_string()),
        }
    }
}

impl From<PlacementError> for Status {
    fn from(error: PlacementError) -> Status {
        let message = error.to_string();
        match error {
            PlacementError::EmptyModel => Status::invalid_argument(message),
            PlacementError::UnknownModel(_) | PlacementError::NotInCatalog(_) => {
                Status::not_found(message)
            }
            PlacementError::NoHealthyNode => Status::unavailable(message),
            PlacementError::TooLarge(_) => Status::failed_precondition(message),
            PlacementError::NoRoom(_) => Status::resource_exhausted(message),
        }
    }
}

impl From<EngineError> for Status {
    fn from(error: EngineError) -> Status {
        match error {
            EngineError::Ledger(LedgerError::NotFound { .. }) => {
                Status::not_found(error.to_string())
            }
            EngineError::Ledger(LedgerError::AlreadyExists { .. }) => {
                Status::already_exists(error.to_string())
            }
            EngineError::Ledger(LedgerError::Invalid(invalid)) => invalid_argument(invalid),
            EngineError::Ledger(LedgerError::FailedPrecondition(_)) => {
                Status::failed_precondition(error.to_string())
            }
            EngineError::Store(_) | EngineError::Stopped => Status::unavailable(error.to_string()),
        }
    }
}

/// `INVALID_ARGUMENT` whose message starts with the field's name.
pub fn invalid_argument(invalid: allot::InvalidArgument) -> Status {
    Status::invalid_argument(format!("{}: {}", invalid.field, invalid.message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn admin_errors_map_to_their_codes_naming_the_field() {
        let status = Status::from(AdminError::invalid("source_id", "must not be empty"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "source_id: must not be empty");
        let status = Status::from(AdminError::Invalid(InvalidArgument::new(
            "filter.key_id",
            "too long",
        )));
        assert_eq!(
            (status.code(), status.message()),
            (Code::InvalidArgument, "filter.key_id: too long")
        );
        assert_eq!(
            Status::from(AdminError::NoUsageStore).code(),
            Code::FailedPrecondition
        );
        let status = Status::from(AdminError::usage_store("connection refused"));
        assert_eq!(
            (status.code(), status.message()),
            (Code::Unavailable, "usage store: connection refused")
        );
    }

    #[test]
    fn placement_errors_map_to_their_codes_naming_the_field() {
        for (error, code) in [
            (PlacementError::EmptyModel, Code::InvalidArgument),
            (PlacementError::UnknownModel("m".into()), Code::NotFound),
            (PlacementError::NotInCatalog("m".into()), Code::NotFound),
            (
                PlacementError::TooLarge("m needs".into()),
                Code::FailedPrecondition,
            ),
            (
                PlacementError::NoRoom("no gpu".into()),
                Code::ResourceExhausted,
            ),
        ] {
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{}", status.message());
            assert!(
                status.message().starts_with("model: "),
                "{}",
                status.message()
            );
        }
        assert_eq!(
            Status::from(PlacementError::NoHealthyNode).code(),
            Code::Unavailable
        );
    }
}
