//! Operators' changes to the ledger: accounts, credits, keys, revocation,
//! limits and tariffs. Each appends the writes that make it durable; none
//! grants or settles anything.

use super::*;

impl Ledger {
    pub fn create_account(
        &mut self,
        account_id: &str,
        name: &str,
        now: UnixMs,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<AccountRecord, LedgerError> {
        if self.accounts.contains_key(account_id) {
            return Err(LedgerError::AlreadyExists {
                what: "account",
                id: account_id.to_string(),
            });
        }
        let account = AccountRecord {
            account_id: account_id.to_string(),
            name: name.to_string(),
            credited: Decimal::ZERO,
            limits: Vec::new(),
            created_at_ms: now,
        };
        self.accounts
            .insert(account_id.to_string(), account.clone());
        self.ensure_counters(&Scope::Account(account_id.to_string()), now, writes);
        writes.push(StoreWrite::PutAccount(account.clone()));
        Ok(account)
    }

    /// Applies a credit transaction once per `(account, source_id)`.
    /// Returns `true` when it was a duplicate (nothing changed).
    pub fn credit(
        &mut self,
        account_id: &str,
        source_id: &str,
        kind: TransactionKind,
        amount: Decimal,
        now: UnixMs,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<bool, LedgerError> {
        let Some(account) = self.accounts.get_mut(account_id) else {
            return Err(not_found("account", account_id));
        };
        let txn_id = (account_id.to_string(), source_id.to_string());
        if self.transactions.contains(&txn_id) {
            return Ok(true);
        }
        account.credited += amount;
        writes.push(StoreWrite::PutAccount(account.clone()));
        writes.push(StoreWrite::PutTransaction(TransactionRecord {
            account_id: account_id.to_string(),
            source_id: source_id.to_string(),
            kind,
            amount,
            at_ms: now,
        }));
        self.transactions.insert(txn_id);
        Ok(false)
    }

    pub fn create_key(
        &mut self,
        key: KeyRecord,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<KeyRecord, LedgerError> {
        if !self.accounts.contains_key(&key.account_id) {
            return Err(not_found("account", &key.account_id));
        }
        if self.keys.contains_key(&key.key_id) {
            return Err(LedgerError::AlreadyExists {
                what: "key",
                id: key.key_id.clone(),
            });
        }
        if self.key_by_hash.contains_key(&key.hash) {
            return Err(LedgerError::FailedPrecondition(
                "a key with this secret already exists".into(),
            ));
        }
        self.index_key(&key);
        self.keys.insert(key.key_id.clone(), key.clone());
        self.ensure_counters(&Scope::Key(key.key_id.clone()), key.created_at_ms, writes);
        writes.push(StoreWrite::PutKey(key.clone()));
        Ok(key)
    }

    pub fn revoke_key(
        &mut self,
        key_id: &str,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<KeyRecord, LedgerError> {
        let key = self
            .keys
            .get_mut(key_id)
            .ok_or_else(|| not_found("key", key_id))?;
        if !key.revoked {
            key.revoked = true;
            writes.push(StoreWrite::PutKey(key.clone()));
        }
        Ok(key.clone())
    }

    /// Replaces the limits of a scope. Spend already counted in a unit and
    /// window that stays keeps counting.
    pub fn set_limits(
        &mut self,
        scope: &Scope,
        limits: Vec<Limit>,
        now: UnixMs,
        writes: &mut Vec<StoreWrite>,
    ) -> Result<(), LedgerError> {
        match scope {
            Scope::Key(id) => {
                let key = self.keys.get_mut(id).ok_or_else(|| not_found("key", id))?;
                key.limits = limits;
                writes.push(StoreWrite::PutKey(key.clone()));
            }
            Scope::Account(id) => {
                let account = self
                    .accounts
                    .get_mut(id)
                    .ok_or_else(|| not_found("account", id))?;
                account.limits = limits;
                writes.push(StoreWrite::PutAccount(account.clone()));
            }
        }
        self.ensure_counters(scope, now, writes);
        Ok(())
    }

    pub fn put_tariff(&mut self, tariff: Tariff, writes: &mut Vec<StoreWrite>) {
        writes.push(StoreWrite::PutTariff(tariff.clone()));
        self.tariffs.put(tariff);
    }

    /// Makes sure the scope counts all-time spend per unit and every window
    /// its limits use.
    pub(super) fn ensure_counters(
        &mut self,
        scope: &Scope,
        now: UnixMs,
        writes: &mut Vec<StoreWrite>,
    ) {
        let limits: Vec<Limit> = match scope {
            Scope::Key(id) => self.keys.get(id).map(|k| k.limits.clone()),
            Scope::Account(id) => self.accounts.get(id).map(|a| a.limits.clone()),
        }
        .unwrap_or_default();
        let state = self.scopes.entry(scope.clone()).or_default();
        let mut changed = false;
        for unit in Unit::ALL {
            changed |= state.counters.ensure(unit, Window::Balance, now);
        }
        for limit in limits {
            changed |= state.counters.ensure(limit.unit, limit.window, now);
        }
        if changed {
            writes.push(StoreWrite::PutCounters(
                scope.clone(),
                state.counters.clone(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::tests::*;

    #[test]
    fn a_credit_is_applied_once_per_source_id() {
        let mut ledger = ledger_with_key(vec![]);
        let mut w = Vec::new();
        assert!(!ledger
            .credit("acme", "p1", TransactionKind::Purchase, dec(5), NOW, &mut w)
            .unwrap());
        assert!(ledger
            .credit("acme", "p1", TransactionKind::Purchase, dec(5), NOW, &mut w)
            .unwrap());
        assert_eq!(ledger.account("acme").unwrap().credited, dec(5));
    }
}
