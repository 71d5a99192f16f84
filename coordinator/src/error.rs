//! The coordinator's errors, mapped to gRPC status codes in one place.

use crate::engine::EngineError;
use crate::ledger::LedgerError;
use tonic::Status;

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
