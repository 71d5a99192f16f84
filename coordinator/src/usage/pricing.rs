use super::*;

/// The row of a settled record. The free-text fields an agent sends are
/// cut to the same bounds the Admin API applies (`allot::bounds`), so that
/// a row stays small whatever the agent's version: the record was already
/// priced and settled with them as sent.
pub fn settled_row(
    agent_id: &str,
    mut record: pb::UsageRecord,
    price: Option<crate::ledger::AppliedPrice>,
    cost: Decimal,
    now: UnixMs,
) -> pb::UsageRow {
    use allot::bounds::{MAX_HEADER_VALUE_BYTES, MAX_ID_BYTES, MAX_MODEL_BYTES};
    for (field, max) in [
        (&mut record.request_id, MAX_HEADER_VALUE_BYTES),
        (&mut record.model_requested, MAX_MODEL_BYTES),
        (&mut record.model_served, MAX_MODEL_BYTES),
        (&mut record.trace_id, MAX_HEADER_VALUE_BYTES),
        (&mut record.span_id, MAX_HEADER_VALUE_BYTES),
        (&mut record.batch_id, MAX_HEADER_VALUE_BYTES),
        (&mut record.completion_window, MAX_HEADER_VALUE_BYTES),
        (&mut record.neuron_id, MAX_ID_BYTES),
        (&mut record.refusal_code, MAX_HEADER_VALUE_BYTES),
    ] {
        let kept = allot::bounds::truncated(field, max).len();
        field.truncate(kept);
    }
    let format = allot::money::format;
    pb::UsageRow {
        agent_id: agent_id.to_string(),
        input_price: price.map(|p| format(p.input_price)).unwrap_or_default(),
        output_price: price.map(|p| format(p.output_price)).unwrap_or_default(),
        cost: format(cost),
        tariff_purpose: price.map_or(0, |p| p.purpose.to_pb() as i32),
        tariff_completion_window: match price {
            Some(p) if p.windowed => record.completion_window.clone(),
            _ => String::new(),
        },
        settled_at_unix_ms: now,
        record: Some(record),
    }
}

/// What a row counts in `unit` against a limit: one request, its tokens,
/// or its cost; nothing when it was not charged.
pub fn row_amount(row: &pb::UsageRow, unit: allot::Unit) -> Decimal {
    let Some(r) = row.record.as_ref().filter(|r| r.charged) else {
        return Decimal::ZERO;
    };
    match unit {
        allot::Unit::Requests => Decimal::ONE,
        allot::Unit::Tokens => Decimal::from(r.prompt_tokens + r.completion_tokens),
        allot::Unit::Credits => allot::money::parse_decimal("cost", &row.cost).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_keeps_an_agents_strings_cut_to_the_admin_bounds() {
        let record = pb::UsageRecord {
            batch_id: "b".repeat(150_000),
            completion_window: "w".repeat(150_000),
            model_requested: "é".repeat(1_000),
            ..Default::default()
        };
        let row = settled_row("agent-1", record, None, Decimal::ZERO, 0);
        let r = row.record.unwrap();
        assert_eq!(r.batch_id.len(), allot::bounds::MAX_HEADER_VALUE_BYTES);
        assert_eq!(
            r.completion_window.len(),
            allot::bounds::MAX_HEADER_VALUE_BYTES
        );
        assert_eq!(r.model_requested.len(), allot::bounds::MAX_MODEL_BYTES);
    }
}
