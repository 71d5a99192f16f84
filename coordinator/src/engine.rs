//! The engine: the one task that owns the ledger and the agent sessions'
//! outboxes. Everything that reads or changes budgets is a job sent to it.
//! Jobs run one after another; the engine drains what is queued (up to a
//! batch size, after an optional settle window), commits the writes of the
//! whole batch in one store transaction, and only then delivers the replies
//! and the messages to agents. A failed or uncertain commit reloads the
//! ledger from the store and fails every job of the batch: nobody is told
//! of a change that is not durable.

use crate::lease::{Ask, LeaseSettings, Leases, Now, Outgoing, SessionId};
use crate::ledger::{Ledger, LedgerConfig, Welcome};
use crate::settle::{Depletions, Settled};
use crate::store::{Store, StoreError, StoreWrite};
use allot::clock::{self, UnixMs};
use allot::pb;
use allot::Amounts;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Messages to one agent, as its session stream expects them.
pub type Outbox = mpsc::Sender<Result<pb::CoordinatorMessage, tonic::Status>>;

/// Messages on one session, for operators (ListAgents) and benchmarks.
#[derive(Debug, Default)]
pub struct SessionCounters {
    pub received: std::sync::atomic::AtomicU64,
    pub sent: std::sync::atomic::AtomicU64,
}

/// A connected agent session.
pub struct SessionLink {
    pub session: SessionId,
    pub epoch: u64,
    pub outbox: Outbox,
    pub counters: Arc<SessionCounters>,
    /// Prompt overheads the agent learned, as it last reported them.
    pub prompt_overheads: std::collections::BTreeMap<String, u64>,
    /// Per key, what the agent's requests in flight reserved, as it last
    /// reported it (gone with the session: then it counts as held).
    pub in_flight: std::collections::BTreeMap<String, allot::Amounts>,
}

/// How often a key history sweep runs: it prunes entries past their
/// retention and refreshes the stored times of slices still held, up to
/// 100,000 entries a sweep (a pass over 10^7 entries takes about 8 minutes,
/// a small ledger's pass one sweep).
pub const KEY_HISTORY_SWEEP: Duration = Duration::from_secs(5);

/// What the engine's jobs may touch, through its methods: the ledger, the
/// lease state and the sessions' outboxes. The decisions are in
/// [`crate::lease`] and [`crate::settle`]; this only routes what they
/// decide to the sessions' outboxes (via [`crate::wire::to_agent`]).
pub struct Core {
    ledger: Ledger,
    leases: Leases,
    depletions: Depletions,
    /// Connected agents' sessions (the same agents as `leases`' sessions).
    links: HashMap<String, SessionLink>,
    next_session: u64,
    settings: EngineSettings,
}

impl Core {
    /// A core over `ledger`, with every agent it knows disconnected.
    pub fn new(ledger: Ledger, settings: EngineSettings) -> Core {
        let leases = Leases::new(settings.lease_settings(), &ledger, Instant::now());
        Core {
            ledger,
            leases,
            depletions: Depletions::default(),
            links: HashMap::new(),
            next_session: 0,
            settings,
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn ledger_mut(&mut self) -> &mut Ledger {
        &mut self.ledger
    }

    pub fn settings(&self) -> &EngineSettings {
        &self.settings
    }

    /// The agent's session, while it is connected.
    pub fn session(&self, agent_id: &str) -> Option<&SessionLink> {
        self.links.get(agent_id)
    }

    pub fn is_connected(&self, agent_id: &str) -> bool {
        self.links.contains_key(agent_id)
    }

    /// Every connected agent.
    pub fn connected_agents(&self) -> Vec<String> {
        self.links.keys().cloned().collect()
    }

    /// Whether `session` is the agent's current session.
    pub fn is_current(&self, agent_id: &str, session: SessionId) -> bool {
        self.leases.is_current(agent_id, session)
    }

    /// An agent's Hello: the session replaces any older one of the agent
    /// (whose stream ends when its outbox is dropped) and is welcomed.
    pub fn connect(
        &mut self,
        fx: &mut Effects,
        agent_id: &str,
        epoch: u64,
        neuron_id: &str,
        outbox: Outbox,
        counters: Arc<SessionCounters>,
    ) -> Result<(SessionId, Welcome), crate::ledger::LedgerError> {
        self.next_session += 1;
        let session = SessionId(self.next_session);
        let mut out = Vec::new();
        let welcome = self.leases.hello(
            &mut self.ledger,
            agent_id,
            epoch,
            neuron_id,
            session,
            &mut fx.writes,
            &mut out,
        )?;
        self.links.insert(
            agent_id.to_string(),
            SessionLink {
                session,
                epoch,
                outbox,
                counters,
                prompt_overheads: Default::default(),
                in_flight: Default::default(),
            },
        );
        self.deliver(fx, out);
        Ok((session, welcome))
    }

    /// The session ended; `false` when a newer one had replaced it.
    pub fn disconnect(&mut self, fx: &Effects, agent_id: &str, session: SessionId) -> bool {
        if !self.leases.disconnect(agent_id, session, fx.at()) {
            return false;
        }
        self.links.remove(agent_id);
        true
    }

    /// `agent_id` looked a key up by its secret's hash and found `key_id`.
    pub fn watch(&mut self, key_id: &str, agent_id: &str) {
        self.leases.watch(key_id, agent_id);
    }

    /// An allowance ask (see [`crate::lease`]).
    pub fn ask(&mut self, fx: &mut Effects, agent_id: &str, session: SessionId, ask: Ask) {
        let mut out = Vec::new();
        self.leases
            .ask(&mut self.ledger, agent_id, session, ask, fx.at(), &mut out);
        self.deliver(fx, out);
    }

    /// The agent gives back part of a slice.
    pub fn give_back(&mut self, fx: &mut Effects, agent_id: &str, key_id: &str, amount: &Amounts) {
        let mut out = Vec::new();
        self.leases.give_back(
            &mut self.ledger,
            agent_id,
            key_id,
            amount,
            fx.at(),
            &mut out,
        );
        self.deliver(fx, out);
    }

    /// Decides the parked asks again.
    pub fn retry_parked(&mut self, fx: &mut Effects) {
        let mut out = Vec::new();
        self.leases
            .retry_parked(&mut self.ledger, fx.at(), &mut out);
        self.deliver(fx, out);
    }

    pub fn has_parked(&self) -> bool {
        self.leases.has_parked()
    }

    /// A usage batch (see [`crate::settle`]).
    pub fn settle(
        &mut self,
        fx: &mut Effects,
        agent_id: &str,
        session: SessionId,
        usages: &[crate::ledger::Usage],
    ) -> Settled {
        let mut out = Vec::new();
        let settled = crate::settle::batch(
            &mut self.ledger,
            &mut self.leases,
            &mut self.depletions,
            agent_id,
            session,
            usages,
            fx.at(),
            &mut fx.writes,
            &mut out,
        );
        self.deliver(fx, out);
        settled
    }

    /// What the agent's requests in flight reserved, per key: only keys it
    /// holds a slice of (what requests reserved comes out of slices).
    pub fn set_in_flight(
        &mut self,
        agent_id: &str,
        mut keys: std::collections::BTreeMap<String, Amounts>,
    ) {
        let held: HashSet<&String> = self
            .ledger
            .slices_of(agent_id)
            .map(|(key_id, _)| key_id)
            .collect();
        keys.retain(|key_id, _| held.contains(key_id));
        if let Some(link) = self.links.get_mut(agent_id) {
            link.in_flight = keys;
        }
    }

    pub fn set_prompt_overheads(
        &mut self,
        agent_id: &str,
        overheads: std::collections::BTreeMap<String, u64>,
    ) {
        if let Some(link) = self.links.get_mut(agent_id) {
            link.prompt_overheads = overheads;
        }
    }

    /// Sends what the core decided, once the batch is committed: to the
    /// addressed session, or to the agent's current one.
    pub fn deliver(&self, fx: &mut Effects, out: Vec<Outgoing>) {
        for outgoing in out {
            let Some(link) = self.links.get(&outgoing.agent_id) else {
                continue;
            };
            if outgoing
                .session
                .is_some_and(|session| session != link.session)
            {
                continue;
            }
            fx.send(&link.outbox, crate::wire::to_agent(outgoing.message));
        }
    }

    /// Queues `message` to every connected agent in `agents`.
    pub fn push_to(
        &self,
        fx: &mut Effects,
        agents: impl IntoIterator<Item = String>,
        message: pb::coordinator_message::Msg,
    ) {
        for agent_id in agents {
            if let Some(link) = self.links.get(&agent_id) {
                fx.send(&link.outbox, message.clone());
            }
        }
    }

    /// What every connected agent's requests in flight reserved on
    /// `key_ids`, in `unit`.
    pub fn in_flight(&self, key_ids: &[String], unit: allot::Unit) -> rust_decimal::Decimal {
        let mut total = rust_decimal::Decimal::ZERO;
        for link in self.links.values() {
            for key_id in key_ids {
                if let Some(amount) = link.in_flight.get(key_id) {
                    total = total.saturating_add(amount.value(unit));
                }
            }
        }
        total
    }

    /// Every agent that should hear about a change of `key_id`: those that
    /// looked it up and those holding a slice of it.
    pub fn interested_in(&self, key_id: &str) -> HashSet<String> {
        self.leases.interested_in(&self.ledger, key_id)
    }

    /// Ends every session (the ledger was reloaded): each agent's Hello on
    /// reconnect is the truth for its slices.
    fn end_sessions(&mut self, reason: &str) {
        let now = Now {
            wall: clock::now_ms(),
            mono: Instant::now(),
        };
        self.leases.disconnect_all(now);
        for (_, link) in self.links.drain() {
            let _ = link
                .outbox
                .try_send(Err(tonic::Status::unavailable(reason.to_string())));
        }
    }
}

type AfterCommit = Box<dyn FnOnce(Result<(), &StoreError>) + Send>;

/// What a batch of jobs produced: writes to commit, then what to do once
/// the commit is known.
pub struct Effects {
    pub now: UnixMs,
    /// The monotonic time of the batch.
    pub mono: Instant,
    pub writes: Vec<StoreWrite>,
    after: Vec<AfterCommit>,
    outbox: Vec<(Outbox, pb::coordinator_message::Msg)>,
}

impl Effects {
    pub(crate) fn new(now: UnixMs) -> Effects {
        Effects {
            now,
            mono: Instant::now(),
            writes: Vec::new(),
            after: Vec::new(),
            outbox: Vec::new(),
        }
    }

    /// The time of the batch, for the lease and settle decisions.
    pub fn at(&self) -> Now {
        Now {
            wall: self.now,
            mono: self.mono,
        }
    }

    /// Runs `f` with the commit's outcome.
    pub fn after_commit(&mut self, f: impl FnOnce(Result<(), &StoreError>) + Send + 'static) {
        self.after.push(Box::new(f));
    }

    /// Sends `message` to an agent once the batch is committed.
    pub fn send(&mut self, outbox: &Outbox, message: pb::coordinator_message::Msg) {
        self.outbox.push((outbox.clone(), message));
    }
}

pub type Job = Box<dyn FnOnce(&mut Core, &mut Effects) + Send>;

#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub lease_ttl: Duration,
    pub dead_after: Duration,
    pub settle_window: Duration,
    pub max_batch: usize,
    pub ledger: LedgerConfig,
    /// Where settled rows go once committed (usage analytics), if kept.
    pub analytics: Option<tokio::sync::mpsc::UnboundedSender<Vec<pb::UsageRow>>>,
    /// Placement's demand, fed with each request once committed.
    pub placement: Option<std::sync::Arc<crate::placement::LivePlacement>>,
}

impl EngineSettings {
    pub fn lease_settings(&self) -> LeaseSettings {
        LeaseSettings {
            lease_ttl: self.lease_ttl,
            dead_after: self.dead_after,
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            lease_ttl: Duration::from_secs(30),
            dead_after: Duration::from_secs(120),
            settle_window: Duration::from_millis(2),
            max_batch: 4096,
            ledger: LedgerConfig::default(),
            analytics: None,
            placement: None,
        }
    }
}

/// Errors a job reports to its caller.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("store unavailable: {0}")]
    Store(String),
    #[error("coordinator is shutting down")]
    Stopped,
}

/// Where services find the engine: the leader's, or none on a standby.
#[derive(Clone)]
pub struct EngineSource(pub tokio::sync::watch::Receiver<Option<EngineHandle>>);

impl EngineSource {
    /// A source that always has `handle` (one coordinator, no election).
    pub fn fixed(
        handle: EngineHandle,
    ) -> (
        EngineSource,
        tokio::sync::watch::Sender<Option<EngineHandle>>,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(Some(handle));
        (EngineSource(rx), tx)
    }

    /// The leader's engine, or UNAVAILABLE on a standby.
    pub fn current(&self) -> Result<EngineHandle, tonic::Status> {
        self.0.borrow().clone().ok_or_else(not_leading)
    }

    /// The leader's engine, waiting up to `hold` for this coordinator to
    /// lead: an agent whose leader died waits at a standby for the election
    /// rather than polling every coordinator. UNAVAILABLE after `hold`.
    pub async fn current_within(&self, hold: Duration) -> Result<EngineHandle, tonic::Status> {
        let mut source = self.0.clone();
        let waited = tokio::time::timeout(hold, async {
            source
                .wait_for(|engine| engine.is_some())
                .await
                .ok()
                .and_then(|engine| engine.clone())
        })
        .await;
        waited.ok().flatten().ok_or_else(not_leading)
    }
}

fn not_leading() -> tonic::Status {
    tonic::Status::unavailable(
        "this coordinator is a standby, not the leader; try another coordinator",
    )
}

/// A cloneable handle to the engine.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
}

impl EngineHandle {
    /// Runs `f` on the engine; its result is returned once its writes are
    /// durable. `f` must validate before it mutates: an `Err` must leave the
    /// ledger unchanged.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Core, &mut Effects) -> Result<T, EngineError> + Send + 'static,
    ) -> Result<T, EngineError> {
        let (reply, answer) = oneshot::channel();
        let job: Job = Box::new(move |core, fx| match f(core, fx) {
            Ok(value) => fx.after_commit(move |outcome| {
                let _ = reply.send(
                    outcome
                        .map(|_| value)
                        .map_err(|e| EngineError::Store(e.to_string())),
                );
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        });
        self.jobs
            .send(job)
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Queues a job without waiting for it.
    pub async fn submit(&self, job: Job) -> Result<(), EngineError> {
        self.jobs.send(job).await.map_err(|_| EngineError::Stopped)
    }
}

pub struct Engine {
    core: Core,
    store: Arc<dyn Store>,
    jobs: mpsc::Receiver<Job>,
    /// A fenced write proved this coordinator is no longer the leader.
    fenced: bool,
}

impl Engine {
    /// Loads the ledger from the store and returns the engine and its handle.
    pub async fn load(
        store: Arc<dyn Store>,
        settings: EngineSettings,
    ) -> Result<(Engine, EngineHandle), StoreError> {
        let stored = store.load().await?;
        // Building a large ledger takes seconds of CPU: keep it off the
        // async workers (the election's keep-alive runs there).
        let config = settings.ledger.clone();
        let ledger = tokio::task::spawn_blocking(move || Ledger::from_stored(config, stored))
            .await
            .map_err(|e| StoreError::NotApplied(format!("loading the ledger failed: {e}")))?;
        Ok(Engine::start(store, settings, ledger))
    }

    /// The engine over a ledger that equals what `store` holds (loaded, or
    /// kept warm by a standby), and its handle.
    pub fn start(
        store: Arc<dyn Store>,
        settings: EngineSettings,
        ledger: Ledger,
    ) -> (Engine, EngineHandle) {
        let (tx, rx) = mpsc::channel(65_536);
        let engine = Engine {
            core: Core::new(ledger, settings),
            store,
            jobs: rx,
            fenced: false,
        };
        (engine, EngineHandle { jobs: tx })
    }

    /// Runs until every handle is dropped, or until a fenced write shows
    /// that this coordinator was deposed.
    pub async fn run(mut self) {
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The first tick is at once: the key history loaded is pruned.
        let mut key_history_sweep = tokio::time::interval(KEY_HISTORY_SWEEP);
        key_history_sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut parked_tick = tokio::time::interval(Duration::from_millis(50));
        parked_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.fenced {
            let first = tokio::select! {
                job = self.jobs.recv() => match job {
                    Some(job) => job,
                    None => return,
                },
                _ = sweep.tick() => {
                    self.release_dead_agents().await;
                    continue;
                }
                _ = key_history_sweep.tick() => {
                    let job: Job = Box::new(|core: &mut Core, fx: &mut Effects| {
                        let forgotten = core.ledger_mut().sweep_key_history(fx.now);
                        if forgotten > 0 {
                            tracing::info!(forgotten, "key history entries past their retention forgotten");
                        }
                    });
                    self.run_batch(vec![job]).await;
                    continue;
                }
                _ = parked_tick.tick(), if self.core.has_parked() => {
                    let job: Job = Box::new(|core: &mut Core, fx: &mut Effects| core.retry_parked(fx));
                    self.run_batch(vec![job]).await;
                    continue;
                }
            };
            let mut batch = vec![first];
            let window = self.core.settings.settle_window;
            if !window.is_zero() {
                let deadline = tokio::time::Instant::now() + window;
                while batch.len() < self.core.settings.max_batch {
                    match tokio::time::timeout_at(deadline, self.jobs.recv()).await {
                        Ok(Some(job)) => batch.push(job),
                        _ => break,
                    }
                }
            }
            while batch.len() < self.core.settings.max_batch {
                match self.jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            self.run_batch(batch).await;
        }
    }

    async fn run_batch(&mut self, batch: Vec<Job>) {
        let mut fx = Effects::new(clock::now_ms());
        let jobs = batch.len();
        for job in batch {
            job(&mut self.core, &mut fx);
        }
        self.core.ledger.flush(&mut fx.writes);
        let Effects {
            writes,
            after,
            outbox,
            ..
        } = fx;
        let write_count = writes.len();
        let started = Instant::now();
        let outcome = if writes.is_empty() {
            Ok(())
        } else {
            self.store.commit(writes).await
        };
        metrics::histogram!("allot_store_commit_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("allot_engine_batch_jobs").record(jobs as f64);
        match &outcome {
            Ok(()) => {
                for (link, message) in outbox {
                    let message = pb::CoordinatorMessage { msg: Some(message) };
                    if link.try_send(Ok(message)).is_err() {
                        metrics::counter!("allot_session_outbox_full_total").increment(1);
                    }
                }
            }
            Err(StoreError::Fenced) => {
                tracing::error!("a write was fenced: this coordinator is no longer the leader");
                self.fenced = true;
            }
            Err(error) => {
                tracing::error!(%error, writes = write_count, "store commit failed; reloading the ledger");
                metrics::counter!("allot_store_commit_failures_total").increment(1);
                self.reload().await;
                self.core
                    .end_sessions("the ledger was reloaded after a failed write; reconnect");
            }
        }
        let outcome_ref = outcome.as_ref().map(|_| ());
        for f in after {
            f(outcome_ref);
        }
    }

    async fn reload(&mut self) {
        let mut delay = Duration::from_millis(50);
        loop {
            match self.store.load().await {
                Ok(stored) => {
                    self.core.ledger =
                        Ledger::from_stored(self.core.settings.ledger.clone(), stored);
                    return;
                }
                Err(StoreError::Fenced) => {
                    self.fenced = true;
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, "reloading the ledger failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn release_dead_agents(&mut self) {
        let now = Now {
            wall: clock::now_ms(),
            mono: Instant::now(),
        };
        let dead = self.core.leases.dead_agents(now);
        if dead.is_empty() {
            return;
        }
        let jobs: Vec<Job> = dead
            .into_iter()
            .map(|agent_id| -> Job {
                Box::new(move |core: &mut Core, _fx: &mut Effects| {
                    core.leases.declare_dead(&mut core.ledger, &agent_id);
                })
            })
            .collect();
        self.run_batch(jobs).await;
    }
}
