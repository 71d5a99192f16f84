//! What every usage record of the path reads the same way, for a refused
//! request ([`super::refuse`]) and a settled one ([`super::settle`]) alike:
//! where the request came from, and its completion window as the tariffs
//! are chosen by it. Plain functions; nothing here records anything.

use allot::key::Purpose;
use allot::pb;

/// Where a request came from, for its usage record.
pub(crate) fn origin(purpose: Purpose, batch_id: &str) -> pb::Origin {
    match purpose {
        Purpose::Batch => pb::Origin::Batch,
        Purpose::Playground => pb::Origin::Frontend,
        _ if !batch_id.is_empty() => pb::Origin::Batch,
        _ => pb::Origin::Api,
    }
}

/// A header value that may be absent (empty) as tariffs take it.
pub(crate) fn non_empty(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_key_or_a_batch_id_makes_a_batch_request() {
        assert_eq!(origin(Purpose::Batch, ""), pb::Origin::Batch);
        assert_eq!(origin(Purpose::Realtime, "b-1"), pb::Origin::Batch);
        assert_eq!(origin(Purpose::Realtime, ""), pb::Origin::Api);
        assert_eq!(origin(Purpose::Playground, ""), pb::Origin::Frontend);
        assert_eq!(non_empty(""), None);
        assert_eq!(non_empty("24h"), Some("24h"));
    }
}
