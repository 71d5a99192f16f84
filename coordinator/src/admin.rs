//! The `Admin` service: what operators do, through grpcurl. Every call
//! passes the operator gate first (`operators`: token or certificate, and scope); every
//! input is validated here, at the edge, and refused with
//! `INVALID_ARGUMENT` naming the field before the ledger sees it. Every
//! mutation records an audit entry (who, what changed) in the engine job
//! that makes the change, so both are in one store commit.

use crate::engine::{Core, Effects, EngineError, EngineSource};
use crate::error::{invalid_argument, AdminError};
use crate::ledger::{KeyRecord, LimitView, Scope, TransactionKind};
use crate::wire::{key_info, tariff_update};
use allot::bounds::{self, check_len, MAX_PAGE, MAX_RESPONSE_BYTES};
use allot::clock;
use allot::key::{validate_allowed_models, validate_id, validate_name, KeyHash, Purpose};
use allot::limit::limits_from_pb;
use allot::money;
use allot::pb::admin_server::Admin;
use allot::pb::coordinator_message::Msg as CoordMsg;
use allot::pb::{self};
use allot::tariff::Tariff;
use allot::InvalidArgument;
use prost::Message;
use rand::RngCore;
use rust_decimal::Decimal;

use crate::operators::operator_of;
use serde_json::json;
use tonic::{Request, Response, Status};

pub struct AdminService {
    engine: EngineSource,
    usage: Option<std::sync::Arc<dyn crate::usage::UsageStore>>,
}

impl AdminService {
    pub fn new(
        engine: EngineSource,
        usage: Option<std::sync::Arc<dyn crate::usage::UsageStore>>,
    ) -> AdminService {
        AdminService { engine, usage }
    }

    fn usage_store(&self) -> Result<&std::sync::Arc<dyn crate::usage::UsageStore>, AdminError> {
        self.usage.as_ref().ok_or(AdminError::NoUsageStore)
    }
}

/// `ListAudit` pages hold this many entries unless asked otherwise.
const DEFAULT_AUDIT_PAGE: usize = 100;
/// Method names are short; a longer filter matches nothing anyway.
const MAX_METHOD_BYTES: usize = 64;

fn check(result: Result<(), InvalidArgument>) -> Result<(), AdminError> {
    result.map_err(AdminError::Invalid)
}

/// A page token that no previous page handed out.
fn foreign_page_token() -> AdminError {
    AdminError::invalid("page_token", "not a token from a previous page")
}

/// Where a List page starts and how many items it may hold.
#[derive(Debug)]
struct PageRequest {
    size: usize,
    /// The sort key of the previous page's last item.
    after: Option<String>,
}

impl PageRequest {
    /// `page_size` 0 means [`MAX_PAGE`]; more is refused. The token is the
    /// previous page's last sort key, hex-encoded.
    fn of(page_size: u32, page_token: &str) -> Result<PageRequest, AdminError> {
        let size = match page_size as usize {
            0 => MAX_PAGE,
            n if n <= MAX_PAGE => n,
            n => {
                return Err(AdminError::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE}, not {n}"),
                ))
            }
        };
        check(check_len(
            "page_token",
            page_token,
            bounds::MAX_PAGE_TOKEN_BYTES,
        ))?;
        let after = crate::usage::decode_token(page_token)
            .map_err(AdminError::Invalid)?
            .map(String::from_utf8)
            .transpose()
            .map_err(|_| foreign_page_token())?;
        Ok(PageRequest { size, after })
    }
}

/// Bytes an item adds to a response: itself, its field tag and its length.
fn encoded_item_len(item: &impl Message) -> usize {
    let len = item.encoded_len();
    1 + prost::length_delimiter_len(len) + len
}

/// One page of a List call: of the items whose sort keys are `keys`, those
/// after the page token, in sort-key order, at most `page.size` of them and
/// at most [`MAX_RESPONSE_BYTES`] encoded (but always at least one); and
/// the next page's token, empty on the last page. Only the page's own
/// items are built (by `view`), so a page costs one pass over the keys,
/// not a view of every item.
fn page_of<'k, T: Message>(
    keys: impl Iterator<Item = &'k str>,
    page: &PageRequest,
    mut view: impl FnMut(&str) -> Result<T, EngineError>,
) -> Result<(Vec<T>, String), EngineError> {
    let mut candidates: Vec<&str> = keys
        .filter(|key| page.after.as_deref().is_none_or(|after| *key > after))
        .collect();
    let mut more = candidates.len() > page.size;
    if more {
        candidates.select_nth_unstable(page.size);
        candidates.truncate(page.size);
    }
    candidates.sort_unstable();
    let mut items = Vec::with_capacity(candidates.len());
    let mut bytes = 0;
    let mut last = None;
    for key in candidates {
        let item = view(key)?;
        let len = encoded_item_len(&item);
        if !items.is_empty() && bytes + len > MAX_RESPONSE_BYTES {
            more = true;
            break;
        }
        bytes += len;
        items.push(item);
        last = Some(key);
    }
    let next = match (more, last) {
        (true, Some(last)) => crate::usage::encode_token(last.as_bytes()),
        _ => String::new(),
    };
    Ok((items, next))
}

/// The sort key of a tariff in `ListTariffs`: model, then start, purpose
/// and window (its identity), as text that sorts in that order.
fn tariff_sort_key(tariff: &Tariff) -> String {
    let from = (i128::from(tariff.valid_from) - i128::from(i64::MIN)) as u64;
    format!(
        "{}\0{from:020}\0{}\0{}",
        tariff.model,
        tariff.purpose.as_str(),
        tariff.completion_window.as_deref().unwrap_or_default()
    )
}

fn account_view(core: &Core, account_id: &str) -> Result<pb::Account, EngineError> {
    let account = core.ledger().account(account_id).ok_or_else(|| {
        EngineError::Ledger(crate::ledger::LedgerError::NotFound {
            what: "account",
            id: account_id.to_string(),
        })
    })?;
    let (spent, reserved) = core.ledger().account_spend(account_id);
    Ok(pb::Account {
        account_id: account.account_id.clone(),
        name: account.name.clone(),
        credited: money::format(account.credited),
        spent: money::format(spent),
        reserved: money::format(reserved),
        remaining: money::format(account.credited - spent - reserved),
        limits: account.limits.iter().map(|l| l.to_pb()).collect(),
    })
}

/// A limit as operators read it. `in_flight` is what the agents reported
/// their requests reserved under the limit's scope; it is part of what they
/// hold, so `held` is the rest (`spent + in_flight + held + remaining` is
/// the cap while the cap is not overspent).
fn limit_status(view: &LimitView, in_flight: Decimal) -> pb::LimitStatus {
    let (scope, scope_id) = match &view.scope {
        Scope::Key(id) => ("key", id.clone()),
        Scope::Account(id) => ("account", id.clone()),
    };
    let in_flight = in_flight.clamp(Decimal::ZERO, view.held);
    pb::LimitStatus {
        scope: scope.into(),
        scope_id,
        limit: Some(view.limit.to_pb()),
        spent: money::format(view.spent),
        reserved: money::format(view.held),
        remaining: money::format(view.remaining),
        next_refill: view.next_refill.map(clock::to_pb),
        in_flight: money::format(in_flight),
        held: money::format(view.held - in_flight),
    }
}

/// An agent as operators see it: what the ledger remembers and, while it
/// is connected, what its session reported.
fn agent_view(core: &Core, agent_id: &str) -> pb::AgentView {
    let session = core.session(agent_id);
    let (epoch, high_water_seq, neuron_id) = core
        .ledger()
        .agent(agent_id)
        .map(|a| (a.epoch, a.high_water_seq, a.neuron_id.clone()))
        .unwrap_or_default();
    let counter = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    pb::AgentView {
        agent_id: agent_id.to_string(),
        epoch,
        connected: session.is_some(),
        messages_received: session.map_or(0, |l| counter(&l.counters.received)),
        messages_sent: session.map_or(0, |l| counter(&l.counters.sent)),
        high_water_seq,
        neuron_id,
        prompt_overheads: session
            .map(|l| l.prompt_overheads.clone().into_iter().collect())
            .unwrap_or_default(),
        slices: core
            .ledger()
            .slices_of(agent_id)
            .map(|(key_id, held)| pb::AgentSlice {
                key_id: key_id.clone(),
                outstanding: Some(held.to_pb()),
            })
            .collect(),
    }
}

/// Tells every agent interested in `key_ids` that they changed, and asks
/// holders to give their slices back so that the next grant follows the
/// new state.
fn push_key_changes(core: &Core, fx: &mut Effects, key_ids: &[String], revoke_slices: bool) {
    for key_id in key_ids {
        let Some(key) = core.ledger().key(key_id) else {
            continue;
        };
        core.push_to(
            fx,
            core.interested_in(key_id),
            CoordMsg::KeyUpdate(pb::KeyUpdate {
                key: Some(key_info(key)),
            }),
        );
        if revoke_slices {
            core.push_to(
                fx,
                core.ledger().holders_of(key_id),
                CoordMsg::Revoke(pb::Revoke {
                    key_id: key_id.clone(),
                    reason: "limits changed".into(),
                }),
            );
        }
    }
}

fn new_secret() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!("sk-allot-{}", hex_lower(&bytes))
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn new_key_id() -> String {
    let mut bytes = [0u8; 6];
    rand::rng().fill_bytes(&mut bytes);
    format!("key-{}", hex_lower(&bytes))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn create_account(
        &self,
        request: Request<pb::CreateAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let operator = operator_of(&request)?;
        let req = request.into_inner();
        check(validate_id("account_id", &req.account_id))?;
        check(validate_name("name", &req.name))?;
        let account = self
            .engine
            .current()?
            .call(move |core, fx| {
                core.ledger_mut().create_account(
                    &req.account_id,
                    &req.name,
                    fx.now,
                    &mut fx.writes,
                )?;
                core.ledger_mut().audit(
                    fx.now,
                    &operator,
                    "CreateAccount",
                    json!({"account_id": req.account_id, "name": req.name}),
                    &mut fx.writes,
                );
                account_view(core, &req.account_id)
            })
            .await?;
        Ok(Response::new(account))
    }

    async fn get_account(
        &self,
        request: Request<pb::GetAccountRequest>,
    ) -> Result<Response<pb::Account>, Status> {
        let req = request.into_inner();
        check(validate_id("account_id", &req.account_id))?;
        let account = self
            .engine
            .current()?
            .call(move |core, _| account_view(core, &req.account_id))
            .await?;
        Ok(Response::new(account))
    }

    async fn list_accounts(
        &self,
        request: Request<pb::ListAccountsRequest>,
    ) -> Result<Response<pb::ListAccountsResponse>, Status> {
        let req = request.into_inner();
        let page = PageRequest::of(req.page_size, &req.page_token)?;
        let (accounts, next_page_token) = self
            .engine
            .current()?
            .call(move |core, _| {
                page_of(
                    core.ledger().accounts().map(|a| a.account_id.as_str()),
                    &page,
                    |id| account_view(core, id),
                )
            })
            .await?;
        Ok(Response::new(pb::ListAccountsResponse {
            accounts,
            next_page_token,
        }))
    }

    async fn credit(
        &self,
        request: Request<pb::CreditRequest>,
    ) -> Result<Response<pb::CreditResponse>, Status> {
        let operator = operator_of(&request)?;
        let req = request.into_inner();
        check(validate_id("account_id", &req.account_id))?;
        if req.source_id.trim().is_empty() {
            return Err(AdminError::invalid("source_id", "must not be empty").into());
        }
        check(check_len(
            "source_id",
            &req.source_id,
            bounds::MAX_SOURCE_ID_BYTES,
        ))?;
        let kind = match pb::CreditKind::try_from(req.kind) {
            Ok(pb::CreditKind::Unspecified) | Ok(pb::CreditKind::Purchase) => {
                TransactionKind::Purchase
            }
            Ok(pb::CreditKind::Adjustment) => TransactionKind::Adjustment,
            Err(_) => return Err(AdminError::invalid("kind", "unknown credit kind").into()),
        };
        let amount = money::parse_amount("amount", &req.amount).map_err(invalid_argument)?;
        if kind == TransactionKind::Purchase && amount <= rust_decimal::Decimal::ZERO {
            return Err(AdminError::invalid("amount", "must be greater than zero").into());
        }
        let response = self
            .engine
            .current()?
            .call(move |core, fx| {
                let duplicate = core.ledger_mut().credit(
                    &req.account_id,
                    &req.source_id,
                    kind,
                    amount,
                    fx.now,
                    &mut fx.writes,
                )?;
                if !duplicate {
                    core.ledger_mut().audit(
                        fx.now,
                        &operator,
                        "Credit",
                        json!({
                            "account_id": req.account_id,
                            "source_id": req.source_id,
                            "kind": kind,
                            "amount": money::format(amount),
                        }),
                        &mut fx.writes,
                    );
                    let keys = core.ledger().keys_of_account(&req.account_id).to_vec();
                    push_key_changes(core, fx, &keys, false);
                }
                Ok(pb::CreditResponse {
                    duplicate,
                    account: Some(account_view(core, &req.account_id)?),
                })
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        let operator = operator_of(&request)?;
        let req = request.into_inner();
        check(validate_id("account_id", &req.account_id))?;
        let key_id = if req.key_id.is_empty() {
            new_key_id()
        } else {
            req.key_id.clone()
        };
        check(validate_id("key_id", &key_id))?;
        let purpose = Purpose::from_pb("purpose", req.purpose).map_err(invalid_argument)?;
        check(validate_allowed_models(
            "allowed_models",
            &req.allowed_models,
        ))?;
        check(validate_name("name", &req.name))?;
        let secret = new_secret();
        let record = KeyRecord {
            key_id,
            account_id: req.account_id,
            hash: KeyHash::of_secret(&secret),
            purpose,
            revoked: false,
            allowed_models: req.allowed_models,
            name: req.name,
            limits: Vec::new(),
            created_at_ms: clock::now_ms(),
        };
        let key = self
            .engine
            .current()?
            .call(move |core, fx| {
                let key = core.ledger_mut().create_key(record, &mut fx.writes)?;
                // The secret and its hash never go into the log.
                core.ledger_mut().audit(
                    fx.now,
                    &operator,
                    "CreateKey",
                    json!({
                        "key_id": key.key_id,
                        "account_id": key.account_id,
                        "purpose": key.purpose.as_str(),
                        "allowed_models": key.allowed_models,
                        "name": key.name,
                    }),
                    &mut fx.writes,
                );
                Ok(key)
            })
            .await?;
        tracing::info!(
            key_id = key.key_id,
            account_id = key.account_id,
            "key created"
        );
        Ok(Response::new(pb::CreateKeyResponse {
            key: Some(key_info(&key)),
            secret,
        }))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        let req = request.into_inner();
        if !req.account_id.is_empty() {
            check(validate_id("account_id", &req.account_id))?;
        }
        let page = PageRequest::of(req.page_size, &req.page_token)?;
        let (keys, next_page_token) = self
            .engine
            .current()?
            .call(move |core, _| {
                let view = |id: &str| {
                    let key = core.ledger().key(id).expect("listed keys exist");
                    Ok(key_info(key))
                };
                if req.account_id.is_empty() {
                    page_of(core.ledger().keys().map(|k| k.key_id.as_str()), &page, view)
                } else {
                    let ids = core.ledger().keys_of_account(&req.account_id);
                    page_of(ids.iter().map(String::as_str), &page, view)
                }
            })
            .await?;
        Ok(Response::new(pb::ListKeysResponse {
            keys,
            next_page_token,
        }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::KeyInfo>, Status> {
        let operator = operator_of(&request)?;
        let req = request.into_inner();
        check(validate_id("key_id", &req.key_id))?;
        let key = self
            .engine
            .current()?
            .call(move |core, fx| {
                let key = core.ledger_mut().revoke_key(&req.key_id, &mut fx.writes)?;
                core.ledger_mut().audit(
                    fx.now,
                    &operator,
                    "RevokeKey",
                    json!({"key_id": key.key_id, "account_id": key.account_id}),
                    &mut fx.writes,
                );
                push_key_changes(core, fx, std::slice::from_ref(&req.key_id), true);
                Ok(key)
            })
            .await?;
        tracing::info!(key_id = key.key_id, "key revoked");
        Ok(Response::new(key_info(&key)))
    }

    async fn set_limits(
        &self,
        request: Request<pb::SetLimitsRequest>,
    ) -> Result<Response<pb::SetLimitsResponse>, Status> {
        let operator = operator_of(&request)?;
        let req = request.into_inner();
        let scope = match req.scope {
            Some(pb::set_limits_request::Scope::KeyId(id)) => {
                check(validate_id("key_id", &id))?;
                Scope::Key(id)
            }
            Some(pb::set_limits_request::Scope::AccountId(id)) => {
                check(validate_id("account_id", &id))?;
                Scope::Account(id)
            }
            None => return Err(AdminError::invalid("scope", "set key_id or account_id").into()),
        };
        let limits = limits_from_pb("limits", &req.limits).map_err(invalid_argument)?;
        let echoed = limits.iter().map(|l| l.to_pb()).collect();
        let (scope_name, scope_id) = match &scope {
            Scope::Key(id) => ("key", id.clone()),
            Scope::Account(id) => ("account", id.clone()),
        };
        let change = json!({
            "scope": scope_name,
            "id": scope_id,
            "limits": serde_json::to_value(&limits).unwrap_or_default(),
        });
        self.engine
            .current()?
            .call(move |core, fx| {
                core.ledger_mut()
                    .set_limits(&scope, limits, fx.now, &mut fx.writes)?;
                core.ledger_mut()
                    .audit(fx.now, &operator, "SetLimits", change, &mut fx.writes);
                let keys = match &scope {
                    Scope::Key(id) => vec![id.clone()],
                    Scope::Account(id) => core.ledger().keys_of_account(id).to_vec(),
                };
                push_key_changes(core, fx, &keys, true);
                Ok(())
            })
            .await?;
        Ok(Response::new(pb::SetLimitsResponse { limits: echoed }))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let req = request.into_inner();
        check(validate_id("key_id", &req.key_id))?;
        let snapshot = self
            .engine
            .current()?
            .call(move |core, fx| {
                let views = core.ledger().limit_views(&req.key_id, fx.now)?;
                let key = core
                    .ledger()
                    .key(&req.key_id)
                    .expect("limit_views checked the key");
                let account_keys = core.ledger().keys_of_account(&key.account_id).to_vec();
                let own_key = [key.key_id.clone()];
                let limits = views
                    .iter()
                    .map(|view| {
                        let keys: &[String] = match view.scope {
                            Scope::Key(_) => &own_key,
                            Scope::Account(_) => &account_keys,
                        };
                        limit_status(view, core.in_flight(keys, view.limit.unit))
                    })
                    .collect();
                Ok(pb::Snapshot {
                    key_id: key.key_id.clone(),
                    account_id: key.account_id.clone(),
                    limits,
                    revoked: key.revoked,
                })
            })
            .await?;
        Ok(Response::new(snapshot))
    }

    async fn put_tariff(
        &self,
        request: Request<pb::PutTariffRequest>,
    ) -> Result<Response<pb::Tariff>, Status> {
        let operator = operator_of(&request)?;
        let req = request.into_inner();
        let wire = req
            .tariff
            .ok_or_else(|| AdminError::invalid("tariff", "is required"))?;
        let tariff = Tariff::from_pb("tariff", &wire).map_err(invalid_argument)?;
        let echoed = tariff.to_pb();
        let change = serde_json::to_value(&tariff).unwrap_or_default();
        self.engine
            .current()?
            .call(move |core, fx| {
                let book = core.ledger().tariffs();
                let replaces = book.all().any(|t| t.identity() == tariff.identity());
                if !replaces && book.all().count() >= bounds::MAX_TARIFFS {
                    return Err(EngineError::Ledger(crate::ledger::LedgerError::Invalid(
                        InvalidArgument::new(
                            "tariff",
                            format!(
                                "the tariff book holds at most {} tariffs: replace or end one",
                                bounds::MAX_TARIFFS
                            ),
                        ),
                    )));
                }
                core.ledger_mut().put_tariff(tariff, &mut fx.writes);
                core.ledger_mut()
                    .audit(fx.now, &operator, "PutTariff", change, &mut fx.writes);
                let update = tariff_update(core.ledger().tariffs());
                core.push_to(fx, core.connected_agents(), update);
                Ok(())
            })
            .await?;
        Ok(Response::new(echoed))
    }

    async fn list_tariffs(
        &self,
        request: Request<pb::ListTariffsRequest>,
    ) -> Result<Response<pb::ListTariffsResponse>, Status> {
        let req = request.into_inner();
        check(check_len("model", &req.model, bounds::MAX_MODEL_BYTES))?;
        let page = PageRequest::of(req.page_size, &req.page_token)?;
        let (tariffs, next_page_token) = self
            .engine
            .current()?
            .call(move |core, _| {
                let by_key: std::collections::HashMap<String, &Tariff> = core
                    .ledger()
                    .tariffs()
                    .all()
                    .filter(|t| req.model.is_empty() || t.model == req.model)
                    .map(|t| (tariff_sort_key(t), t))
                    .collect();
                page_of(by_key.keys().map(String::as_str), &page, |key| {
                    Ok(by_key[key].to_pb())
                })
            })
            .await?;
        Ok(Response::new(pb::ListTariffsResponse {
            tariffs,
            next_page_token,
        }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let req = request.into_inner();
        let page = PageRequest::of(req.page_size, &req.page_token)?;
        let (agents, next_page_token) = self
            .engine
            .current()?
            .call(move |core, _| {
                let view = |agent_id: &str| Ok(agent_view(core, agent_id));
                page_of(
                    core.ledger().agents().map(|a| a.agent_id.as_str()),
                    &page,
                    view,
                )
            })
            .await?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents,
            next_page_token,
        }))
    }

    async fn reset_agent(
        &self,
        request: Request<pb::ResetAgentRequest>,
    ) -> Result<Response<pb::AgentView>, Status> {
        let operator = operator_of(&request)?;
        let req = request.into_inner();
        check(validate_id("agent_id", &req.agent_id))?;
        let view = self
            .engine
            .current()?
            .call(move |core, fx| {
                if core.is_connected(&req.agent_id) {
                    return Err(EngineError::Ledger(
                        crate::ledger::LedgerError::FailedPrecondition(format!(
                            "agent {} is connected: only an agent that cannot connect is reset",
                            req.agent_id
                        )),
                    ));
                }
                let before = core.ledger().agent(&req.agent_id).map(|a| a.epoch);
                core.ledger_mut()
                    .reset_agent(&req.agent_id, &mut fx.writes)?;
                core.ledger_mut().audit(
                    fx.now,
                    &operator,
                    "ResetAgent",
                    json!({"agent_id": req.agent_id, "epoch_before": before}),
                    &mut fx.writes,
                );
                Ok(agent_view(core, &req.agent_id))
            })
            .await?;
        tracing::warn!(agent_id = view.agent_id, "agent reset by an operator");
        Ok(Response::new(view))
    }

    async fn list_usage(
        &self,
        request: Request<pb::ListUsageRequest>,
    ) -> Result<Response<pb::ListUsageResponse>, Status> {
        let request = request.into_inner();
        let filter = request.filter.unwrap_or_default();
        crate::usage::validate_filter(&filter).map_err(AdminError::Invalid)?;
        let limit = crate::usage::page_size(request.page_size).map_err(AdminError::Invalid)?;
        let after = crate::usage::decode_token(&request.page_token).map_err(AdminError::Invalid)?;
        let (mut rows, mut next) = self
            .usage_store()?
            .list(filter, after, limit)
            .await
            .map_err(AdminError::usage_store)?;
        // Cut the page where it would pass the response bound; the next
        // page continues after the last row kept.
        let mut bytes = 0;
        if let Some(cut) = rows.iter().position(|row| {
            bytes += encoded_item_len(row);
            bytes > MAX_RESPONSE_BYTES
        }) {
            rows.truncate(cut.max(1));
            next = rows.last().map(crate::usage::row_key);
        }
        Ok(Response::new(pb::ListUsageResponse {
            rows,
            next_page_token: next
                .map(|key| crate::usage::encode_token(&key))
                .unwrap_or_default(),
        }))
    }

    async fn check_usage(
        &self,
        request: Request<pb::CheckUsageRequest>,
    ) -> Result<Response<pb::CheckUsageResponse>, Status> {
        let req = request.into_inner();
        check(validate_id("key_id", &req.key_id))?;
        let store = self.usage_store()?.clone();
        let key_id = req.key_id.clone();
        let balances = self
            .engine
            .current()?
            .call(move |core, fx| {
                let views = core.ledger().limit_views(&key_id, fx.now)?;
                let balances: Vec<(Scope, allot::Unit, rust_decimal::Decimal)> = views
                    .iter()
                    .filter(|v| v.limit.window.is_balance())
                    .map(|v| (v.scope.clone(), v.limit.unit, v.spent))
                    .collect();
                Ok(balances)
            })
            .await?;
        let mut checks = Vec::new();
        for (scope, unit, ledger_spent) in balances {
            let (scope_name, scope_id, filter) = match &scope {
                Scope::Key(id) => (
                    "key",
                    id.clone(),
                    pb::UsageFilter {
                        key_id: id.clone(),
                        ..Default::default()
                    },
                ),
                Scope::Account(id) => (
                    "account",
                    id.clone(),
                    pb::UsageFilter {
                        account_id: id.clone(),
                        ..Default::default()
                    },
                ),
            };
            let rows = crate::usage::list_all(store.as_ref(), &filter)
                .await
                .map_err(AdminError::usage_store)?;
            let total: rust_decimal::Decimal = rows
                .iter()
                .map(|row| crate::usage::row_amount(row, unit))
                .sum();
            checks.push(pb::UsageCheck {
                scope: scope_name.into(),
                scope_id,
                unit: unit.to_pb() as i32,
                ledger_spent: money::format(ledger_spent),
                rows_total: money::format(total),
                difference: money::format(total - ledger_spent),
            });
        }
        let agrees = checks.iter().all(|c| c.ledger_spent == c.rows_total);
        Ok(Response::new(pb::CheckUsageResponse { checks, agrees }))
    }

    async fn usage_summary(
        &self,
        request: Request<pb::UsageSummaryRequest>,
    ) -> Result<Response<pb::UsageSummaryResponse>, Status> {
        let request = request.into_inner();
        let filter = request.filter.unwrap_or_default();
        crate::usage::validate_filter(&filter).map_err(AdminError::Invalid)?;
        let granularity = pb::Granularity::try_from(request.granularity).map_err(|_| {
            AdminError::invalid(
                "granularity",
                format!("unknown granularity {}", request.granularity),
            )
        })?;
        let rows = crate::usage::list_all(self.usage_store()?.as_ref(), &filter)
            .await
            .map_err(AdminError::usage_store)?;
        let buckets = crate::usage::summarize(rows, granularity);
        let bytes: usize = buckets.iter().map(encoded_item_len).sum();
        if bytes > MAX_RESPONSE_BYTES {
            return Err(AdminError::invalid(
                "filter",
                format!(
                    "the summary has {} buckets ({bytes} bytes), more than one response holds \
                     ({MAX_RESPONSE_BYTES} bytes): narrow filter.from_unix_ms and \
                     filter.to_unix_ms, or filter by key or model",
                    buckets.len()
                ),
            )
            .into());
        }
        Ok(Response::new(pb::UsageSummaryResponse { buckets }))
    }

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        let req = request.into_inner();
        if !req.operator.is_empty() {
            check(validate_id("operator", &req.operator))?;
        }
        check(check_len("method", &req.method, MAX_METHOD_BYTES))?;
        let size = match req.page_size as usize {
            0 => DEFAULT_AUDIT_PAGE,
            n if n <= MAX_PAGE => n,
            n => {
                return Err(AdminError::invalid(
                    "page_size",
                    format!("must be at most {MAX_PAGE}, not {n}"),
                )
                .into())
            }
        };
        let before = match req.page_token.as_str() {
            "" => None,
            token => Some(token.parse::<u64>().map_err(|_| foreign_page_token())?),
        };
        let (entries, next_page_token) = self
            .engine
            .current()?
            .call(move |core, _| {
                let matching = core.ledger().audit_log().newest_first().filter(|e| {
                    before.is_none_or(|b| e.seq < b)
                        && (req.operator.is_empty() || e.operator == req.operator)
                        && (req.method.is_empty() || e.method == req.method)
                        && (req.from_unix_ms == 0 || e.at_ms >= req.from_unix_ms)
                        && (req.to_unix_ms == 0 || e.at_ms < req.to_unix_ms)
                });
                let (mut entries, mut bytes, mut next) = (Vec::new(), 0, String::new());
                for entry in matching {
                    let item = entry.to_pb();
                    let len = encoded_item_len(&item);
                    let full = entries.len() >= size
                        || (!entries.is_empty() && bytes + len > MAX_RESPONSE_BYTES);
                    if full {
                        if let Some(last) = entries.last() {
                            let last: &pb::AuditEntry = last;
                            next = last.seq.to_string();
                        }
                        break;
                    }
                    bytes += len;
                    entries.push(item);
                }
                Ok((entries, next))
            })
            .await?;
        Ok(Response::new(pb::ListAuditResponse {
            entries,
            next_page_token,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("id-{i:03}")).collect()
    }

    /// Every page of `ids`, each item a key of `name_bytes` bytes of name.
    fn pages(ids: &[String], page_size: u32, name_bytes: usize) -> Vec<Vec<pb::KeyInfo>> {
        let (mut pages, mut token) = (Vec::new(), String::new());
        loop {
            let page = PageRequest::of(page_size, &token).unwrap();
            let (items, next) = page_of(ids.iter().map(String::as_str), &page, |id| {
                Ok(pb::KeyInfo {
                    key_id: id.to_string(),
                    name: "n".repeat(name_bytes),
                    ..Default::default()
                })
            })
            .unwrap();
            pages.push(items);
            if next.is_empty() {
                return pages;
            }
            token = next;
        }
    }

    #[test]
    fn pages_hold_at_most_page_size_items_in_order_each_once() {
        let ids = ids(25);
        let got = pages(&ids, 10, 10);
        assert_eq!(
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![10, 10, 5]
        );
        let seen: Vec<String> = got.into_iter().flatten().map(|k| k.key_id).collect();
        assert_eq!(seen, ids);
    }

    #[test]
    fn a_page_stops_before_the_response_bound_and_the_next_continues() {
        let ids = ids(10);
        let got = pages(&ids, 0, 1 << 20);
        assert!(got.len() >= 4, "{} pages", got.len());
        for page in &got {
            let response = pb::ListKeysResponse {
                keys: page.clone(),
                next_page_token: String::new(),
            };
            assert!(response.encoded_len() <= MAX_RESPONSE_BYTES);
        }
        let seen: Vec<String> = got.into_iter().flatten().map(|k| k.key_id).collect();
        assert_eq!(seen, ids);
    }

    #[test]
    fn page_requests_are_checked() {
        assert_eq!(PageRequest::of(0, "").unwrap().size, MAX_PAGE);
        let err = Status::from(PageRequest::of(1001, "").unwrap_err());
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(err.message(), "page_size: must be at most 1000, not 1001");
        assert!(PageRequest::of(0, "zz").is_err());
        assert!(PageRequest::of(0, &"ab".repeat(300)).is_err());
    }
}
