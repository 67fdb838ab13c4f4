//! Keeps a certificate for every identity the gateway needs: its own (`default`) and any number of
//! others keyed by SPIFFE ID. One task per identity: generate a key and CSR, ask the CA, verify the
//! chain, publish, sleep until half-life; on failure keep the still-valid certificate and back off.
//! A bad answer never replaces a good certificate.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::Code;
use tracing::{error, info, warn};

use super::csr;
use super::istiod::{CaBackend, CaError, SignRequest};
use super::rotation::{Backoff, Retry, retry_at, schedule};
use super::verify::verify_chain;
use super::{CertBundle, SecretSet, SpiffeId};
use crate::metrics::Metrics;

/// An identity to keep a certificate for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySpec {
    pub id: SpiffeId,
    /// Service-account token (audience `istio-ca`) proving this identity to istiod.
    pub token_file: Option<PathBuf>,
    /// Or a minter that asks Kubernetes for one (takes precedence over `token_file`).
    pub minter: Option<super::token::Minter>,
}

/// Wall-clock time that advances with tokio's clock, so paused-time tests drive rotation.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base_sys: SystemTime,
    base: tokio::time::Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            base_sys: SystemTime::now(),
            base: tokio::time::Instant::now(),
        }
    }
    pub fn now(&self) -> SystemTime {
        self.base_sys + self.base.elapsed()
    }
    pub async fn sleep_until(&self, t: SystemTime) {
        let d = t.duration_since(self.now()).unwrap_or_default();
        tokio::time::sleep(d).await;
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    Initializing,
    Available,
    Unavailable(String),
}

struct Entry {
    spec: IdentitySpec,
    state: State,
    cert: Option<Arc<CertBundle>>,
    next_attempt: Option<SystemTime>,
    last_error: Option<String>,
    renewals: u64,
    /// Up to when the time served without a valid certificate has been counted.
    expired_counted_to: Option<SystemTime>,
    task: Option<JoinHandle<()>>,
}

struct Inner {
    ca: Arc<dyn CaBackend>,
    ttl: Duration,
    clock: Clock,
    default_identity: SpiffeId,
    entries: Mutex<BTreeMap<SpiffeId, Entry>>,
    tx: watch::Sender<SecretSet>,
    metrics: Arc<Metrics>,
}

/// Owns every identity's rotation task. Dropping it stops them.
pub struct IdentityManager {
    inner: Arc<Inner>,
}

impl Drop for IdentityManager {
    fn drop(&mut self) {
        for e in lock(&self.inner.entries).values_mut() {
            if let Some(t) = e.task.take() {
                t.abort();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn retry_kind(e: &CaError) -> Retry {
    match e.code {
        Code::Unauthenticated
        | Code::InvalidArgument
        | Code::PermissionDenied
        | Code::FailedPrecondition => Retry::Slow,
        _ => Retry::Transient,
    }
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn ts(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

impl IdentityManager {
    /// Starts rotating the gateway's own identity; publishes [`SecretSet`]s on the returned channel.
    pub fn start(
        ca: Arc<dyn CaBackend>,
        ttl: Duration,
        default: IdentitySpec,
        metrics: Arc<Metrics>,
        clock: Clock,
    ) -> (IdentityManager, watch::Receiver<SecretSet>) {
        let (tx, rx) = watch::channel(SecretSet {
            default_identity: Some(default.id.clone()),
            ..Default::default()
        });
        let inner = Arc::new(Inner {
            ca,
            ttl,
            clock,
            default_identity: default.id.clone(),
            entries: Mutex::new(BTreeMap::new()),
            tx,
            metrics,
        });
        let m = IdentityManager { inner };
        m.add(default);
        (m, rx)
    }

    fn add(&self, spec: IdentitySpec) {
        let mut entries = lock(&self.inner.entries);
        if let Some(e) = entries.get(&spec.id)
            && e.spec == spec
        {
            return;
        }
        if let Some(mut old) = entries.remove(&spec.id)
            && let Some(t) = old.task.take()
        {
            t.abort();
        }
        let id = spec.id.clone();
        let inner = self.inner.clone();
        let task_spec = spec.clone();
        let task = tokio::spawn(async move { run(inner, task_spec).await });
        entries.insert(
            id,
            Entry {
                spec,
                state: State::Initializing,
                cert: None,
                next_attempt: None,
                last_error: None,
                renewals: 0,
                expired_counted_to: None,
                task: Some(task),
            },
        );
    }

    /// Sets the additional identities (besides the gateway's own). New ones start rotating, removed
    /// ones stop and leave the published set.
    pub fn set_identities(&self, extra: Vec<IdentitySpec>) {
        let keep: BTreeMap<SpiffeId, IdentitySpec> = extra
            .into_iter()
            .filter(|s| s.id != self.inner.default_identity)
            .map(|s| (s.id.clone(), s))
            .collect();
        let removed: Vec<SpiffeId> = lock(&self.inner.entries)
            .keys()
            .filter(|k| **k != self.inner.default_identity && !keep.contains_key(*k))
            .cloned()
            .collect();
        {
            let mut entries = lock(&self.inner.entries);
            for id in &removed {
                if let Some(mut e) = entries.remove(id)
                    && let Some(t) = e.task.take()
                {
                    t.abort();
                }
                self.inner.metrics.remove(
                    "winmesh_cert_expiry_timestamp_seconds",
                    &[("identity", &id.to_string())],
                );
            }
        }
        for spec in keep.into_values() {
            self.add(spec);
        }
        publish(&self.inner);
    }

    /// True while the gateway's own identity has a certificate that has not expired.
    pub fn is_ready(&self) -> bool {
        self.readiness().is_ok()
    }

    /// Readiness of the gateway's own identity, computed now: a certificate that expired makes the
    /// gateway unready even if no CA answer arrived since (every new mTLS handshake would fail).
    pub fn readiness(&self) -> Result<(), String> {
        let now = self.inner.clock.now();
        let entries = lock(&self.inner.entries);
        let Some(e) = entries.get(&self.inner.default_identity) else {
            return Err("no certificate for the gateway identity yet".into());
        };
        match &e.cert {
            None => Err(match &e.last_error {
                Some(err) => format!("no certificate for the gateway identity yet: {err}"),
                None => "no certificate for the gateway identity yet".into(),
            }),
            Some(c) if c.not_after() <= now => Err(format!(
                "the gateway certificate expired at {}{}",
                ts(c.not_after()),
                e.last_error
                    .as_ref()
                    .map(|err| format!("; renewal failing: {err}"))
                    .unwrap_or_default()
            )),
            Some(_) => Ok(()),
        }
    }

    /// State of one identity.
    pub fn state(&self, id: &SpiffeId) -> Option<State> {
        lock(&self.inner.entries).get(id).map(|e| e.state.clone())
    }

    /// `/debug/certs`: every identity, its state, chain facts and root fingerprints. No key material.
    pub fn view(&self) -> Value {
        let now = self.inner.clock.now();
        let entries = lock(&self.inner.entries);
        let list: Vec<Value> = entries
            .values()
            .map(|e| {
                let state = match (&e.state, &e.cert) {
                    // The timer marks expiry; between its tick and this view, say the truth anyway.
                    (State::Available, Some(c)) if c.not_after() <= now => {
                        format!("Unavailable: certificate expired at {}", ts(c.not_after()))
                    }
                    (State::Initializing, _) => "Initializing".to_string(),
                    (State::Available, _) => "Available".to_string(),
                    (State::Unavailable(why), _) => format!("Unavailable: {why}"),
                };
                let sds_name = if e.spec.id == self.inner.default_identity {
                    "default".to_string()
                } else {
                    e.spec.id.to_string()
                };
                let mut v = json!({
                    "identity": e.spec.id.to_string(),
                    "sds_name": sds_name,
                    "state": state,
                    "renewals": e.renewals,
                    "next_renewal": e.next_attempt.map(ts),
                    "last_error": e.last_error,
                });
                if let Some(c) = &e.cert {
                    v["serial"] = json!(c.leaf.serial);
                    v["not_before"] = json!(ts(c.leaf.not_before));
                    v["not_after"] = json!(ts(c.leaf.not_after));
                    v["chain"] = json!(
                        std::iter::once(&c.leaf)
                            .chain(c.intermediates.iter())
                            .collect::<Vec<_>>()
                    );
                    v["roots"] = json!(c.roots.iter().map(|r| json!({
                        "subject": r.subject, "sha256": r.sha256, "not_after": ts(r.not_after)
                    })).collect::<Vec<_>>());
                }
                v
            })
            .collect();
        json!({ "ca": self.inner.ca.describe(), "identities": list })
    }
}

/// Rebuilds and publishes the secret set if it changed.
fn publish(inner: &Inner) {
    let entries = lock(&inner.entries);
    let mut set = SecretSet {
        default_identity: Some(inner.default_identity.clone()),
        ..Default::default()
    };
    for (id, e) in entries.iter() {
        if let Some(c) = &e.cert {
            set.certs.insert(id.clone(), c.clone());
            for r in &c.roots_pem {
                if !set.roots_pem.contains(r) {
                    set.roots_pem.push(r.clone());
                }
            }
        }
    }
    set.roots_pem.sort();
    drop(entries);
    inner.tx.send_if_modified(|cur| {
        let same = cur.default_identity == set.default_identity
            && cur.roots_pem == set.roots_pem
            && cur.certs.len() == set.certs.len()
            && cur
                .certs
                .iter()
                .zip(set.certs.iter())
                .all(|((a, x), (b, y))| a == b && Arc::ptr_eq(x, y));
        if !same {
            *cur = set;
        }
        !same
    });
}

async fn fetch(inner: &Inner, spec: &IdentitySpec) -> Result<CertBundle, CaError> {
    let k = csr::generate(&spec.id).map_err(|e| CaError::new(Code::Internal, e.to_string()))?;
    let chain = inner
        .ca
        .sign(SignRequest {
            identity: spec.id.clone(),
            csr_pem: k.csr_pem,
            ttl: inner.ttl,
            token_file: spec.token_file.clone(),
            minter: spec.minter.clone(),
            now: inner.clock.now(),
        })
        .await?;
    verify_chain(
        &spec.id,
        k.key,
        &k.public_key_der,
        &chain,
        inner.clock.now(),
    )
    .map_err(|e| CaError::new(Code::DataLoss, format!("rejected certificate from CA: {e}")))
}

async fn run(inner: Arc<Inner>, spec: IdentitySpec) {
    let mut backoff = Backoff::default();
    let id = spec.id.to_string();
    loop {
        let result = fetch(&inner, &spec).await;
        let code = match &result {
            Ok(_) => "OK".to_string(),
            Err(e) => format!("{:?}", e.code),
        };
        inner.metrics.inc(
            "winmesh_ca_requests_total",
            "Certificate signing requests sent to the CA, by result code.",
            &[("code", &code)],
            1.0,
        );
        let wake = match result {
            Ok(bundle) => {
                backoff.reset();
                let bundle = Arc::new(bundle);
                let at = schedule(
                    bundle.not_before(),
                    bundle.not_after(),
                    inner.clock.now(),
                    rand::random::<f64>() * 2.0 - 1.0,
                );
                info!(identity = %id, serial = %bundle.leaf.serial, not_after = %ts(bundle.not_after()),
                      renew_at = %ts(at), "certificate issued");
                inner.metrics.set(
                    "winmesh_cert_expiry_timestamp_seconds",
                    "NotAfter of the current certificate of each identity (Unix seconds).",
                    &[("identity", &id)],
                    epoch_secs(bundle.not_after()),
                );
                {
                    let mut entries = lock(&inner.entries);
                    let Some(e) = entries.get_mut(&spec.id) else {
                        return;
                    };
                    if e.cert.is_some() {
                        e.renewals += 1;
                    }
                    // Count the last stretch served with an expired certificate, if any.
                    if let Some(from) = e.expired_counted_to.take() {
                        count_expired(&inner.metrics, &id, from, inner.clock.now());
                    }
                    e.cert = Some(bundle);
                    e.state = State::Available;
                    e.last_error = None;
                    e.next_attempt = Some(at);
                }
                publish(&inner);
                at
            }
            Err(err) => {
                inner.metrics.inc(
                    "winmesh_ca_request_failures_total",
                    "Failed certificate requests, by gRPC code.",
                    &[("code", &code)],
                    1.0,
                );
                let retry = retry_kind(&err);
                let delay = backoff.next_delay(retry, rand::random::<f64>());
                if retry == Retry::Slow {
                    error!(identity = %id, error = %err, retry_in = ?delay,
                           "certificate request refused; fix the token or configuration (not retrying quickly)");
                } else {
                    warn!(identity = %id, error = %err, retry_in = ?delay, "certificate request failed");
                }
                let now = inner.clock.now();
                let mut entries = lock(&inner.entries);
                let Some(e) = entries.get_mut(&spec.id) else {
                    return;
                };
                let at = retry_at(now, delay, e.cert.as_ref().map(|c| c.not_after()));
                e.last_error = Some(err.to_string());
                e.next_attempt = Some(at);
                // Keep serving a still-valid certificate; only its absence or expiry is Unavailable.
                e.state = match e.cert.as_ref().map(|c| c.not_after()) {
                    Some(na) if na > now => State::Available,
                    Some(na) => State::Unavailable(format!(
                        "certificate expired at {}; renewal failing: {err}",
                        ts(na)
                    )),
                    None => State::Unavailable(err.to_string()),
                };
                at
            }
        };
        wait_watching_expiry(&inner, &spec, wake).await;
    }
}

/// Longest sleep while a certificate is expired, so the expired-time counter stays current.
const EXPIRED_TICK: Duration = Duration::from_secs(5);

/// Sleeps until `wake`, but also wakes at the current certificate's NotAfter to mark the identity
/// Unavailable then (not only at the next CA answer), and counts the time served without a valid
/// certificate.
async fn wait_watching_expiry(inner: &Inner, spec: &IdentitySpec, wake: SystemTime) {
    loop {
        let now = inner.clock.now();
        account_expiry(inner, spec, now);
        if now >= wake {
            return;
        }
        let (expires, expired) = {
            let entries = lock(&inner.entries);
            let na = entries
                .get(&spec.id)
                .and_then(|e| e.cert.as_ref().map(|c| c.not_after()));
            (na.filter(|na| *na > now), na.is_some_and(|na| na <= now))
        };
        let mut until = wake;
        if let Some(na) = expires {
            until = until.min(na);
        }
        if expired {
            until = until.min(now + EXPIRED_TICK);
        }
        inner.clock.sleep_until(until).await;
    }
}

/// Marks an expired certificate Unavailable (once, with an error log) and adds the time since the
/// last accounting to `winmesh_cert_expired_seconds_total`.
fn account_expiry(inner: &Inner, spec: &IdentitySpec, now: SystemTime) {
    let id = spec.id.to_string();
    let mut entries = lock(&inner.entries);
    let Some(e) = entries.get_mut(&spec.id) else {
        return;
    };
    let Some(na) = e.cert.as_ref().map(|c| c.not_after()) else {
        return;
    };
    inner.metrics.set(
        "winmesh_cert_valid",
        "1 while the identity's current certificate is within its validity period.",
        &[("identity", &id)],
        if na > now { 1.0 } else { 0.0 },
    );
    if na > now {
        e.expired_counted_to = None;
        return;
    }
    if e.state == State::Available || e.expired_counted_to.is_none() {
        error!(identity = %id, not_after = %ts(na), last_error = ?e.last_error,
               "certificate expired and not renewed: new mTLS handshakes fail until the CA issues one");
        e.state = State::Unavailable(format!(
            "certificate expired at {}{}",
            ts(na),
            e.last_error
                .as_ref()
                .map(|err| format!("; renewal failing: {err}"))
                .unwrap_or_default()
        ));
    }
    let from = e.expired_counted_to.unwrap_or(na).max(na);
    e.expired_counted_to = Some(now);
    count_expired(&inner.metrics, &id, from, now);
}

/// Adds `from..now` to `winmesh_cert_expired_seconds_total` for `id`.
fn count_expired(metrics: &Metrics, id: &str, from: SystemTime, now: SystemTime) {
    metrics.inc(
        "winmesh_cert_expired_seconds_total",
        "Seconds an identity was served with an expired certificate (renewal failing).",
        &[("identity", id)],
        now.duration_since(from).unwrap_or_default().as_secs_f64(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::dev_ca::DevCa;
    use futures::future::BoxFuture;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Fails the first `fail` calls with `code`, then signs with a dev CA.
    struct Flaky {
        ca: DevCa,
        fail: usize,
        code: Code,
        calls: AtomicUsize,
    }

    impl CaBackend for Flaky {
        fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>, CaError>> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.fail {
                let code = self.code;
                Box::pin(async move { Err(CaError::new(code, "injected")) })
            } else {
                self.ca.sign(req)
            }
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    fn gw() -> IdentitySpec {
        IdentitySpec {
            id: SpiffeId::parse("spiffe://cluster.local/ns/win/sa/gw").unwrap(),
            token_file: None,
            minter: None,
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rotates_at_half_life() {
        let ca = Arc::new(DevCa::new_root("cluster.local").unwrap());
        let (m, mut rx) = IdentityManager::start(
            ca,
            Duration::from_secs(1000),
            gw(),
            Arc::new(Metrics::new()),
            Clock::new(),
        );
        rx.changed().await.unwrap();
        let first = rx.borrow_and_update().certs[&gw().id].leaf.serial.clone();
        assert!(m.is_ready());
        // NotBefore is backdated 120 s, so half-life is at now + (1120/2 - 120) = now + 440 s, ±11 s.
        tokio::time::sleep(Duration::from_secs(420)).await;
        settle().await;
        assert!(!rx.has_changed().unwrap(), "renewed too early");
        tokio::time::sleep(Duration::from_secs(40)).await;
        settle().await;
        assert!(rx.has_changed().unwrap(), "not renewed at half-life");
        let second = rx.borrow_and_update().certs[&gw().id].leaf.serial.clone();
        assert_ne!(first, second);
        assert_eq!(m.view()["identities"][0]["renewals"], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_back_off_exponentially() {
        let ca = Arc::new(Flaky {
            ca: DevCa::new_root("cluster.local").unwrap(),
            fail: 4,
            code: Code::Unavailable,
            calls: AtomicUsize::new(0),
        });
        let (m, mut rx) = IdentityManager::start(
            ca.clone(),
            Duration::from_secs(1000),
            gw(),
            Arc::new(Metrics::new()),
            Clock::new(),
        );
        settle().await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 1);
        assert!(matches!(m.state(&gw().id), Some(State::Unavailable(_))));
        // Delays 0.5, 1, 2, 4 s (±20%): after 0.6 + 1.2 + 2.4 + 4.8 s all four retries happened.
        let mut elapsed = 0.0;
        for (n, d) in [(2, 0.6), (3, 1.2), (4, 2.4), (5, 4.8)] {
            tokio::time::sleep(Duration::from_secs_f64(d)).await;
            elapsed += d;
            settle().await;
            assert_eq!(ca.calls.load(Ordering::SeqCst), n, "after {elapsed} s");
        }
        rx.changed().await.unwrap();
        assert_eq!(m.state(&gw().id), Some(State::Available));
    }

    #[tokio::test(start_paused = true)]
    async fn unauthenticated_is_not_hammered() {
        let ca = Arc::new(Flaky {
            ca: DevCa::new_root("cluster.local").unwrap(),
            fail: 100,
            code: Code::Unauthenticated,
            calls: AtomicUsize::new(0),
        });
        let metrics = Arc::new(Metrics::new());
        let (m, _rx) = IdentityManager::start(
            ca.clone(),
            Duration::from_secs(1000),
            gw(),
            metrics.clone(),
            Clock::new(),
        );
        settle().await;
        tokio::time::sleep(Duration::from_secs(115)).await;
        settle().await;
        assert_eq!(
            ca.calls.load(Ordering::SeqCst),
            1,
            "retried within two minutes"
        );
        tokio::time::sleep(Duration::from_secs(80)).await;
        settle().await;
        assert_eq!(ca.calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            metrics.value(
                "winmesh_ca_request_failures_total",
                &[("code", "Unauthenticated")]
            ),
            Some(2.0)
        );
        let v = m.view();
        assert!(
            v["identities"][0]["state"]
                .as_str()
                .unwrap()
                .starts_with("Unavailable: Unauthenticated")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn failed_renewal_keeps_the_valid_certificate() {
        struct FailAfterFirst {
            ca: DevCa,
            calls: AtomicUsize,
        }
        impl CaBackend for FailAfterFirst {
            fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>, CaError>> {
                if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    self.ca.sign(req)
                } else {
                    // A garbage chain must never replace the good certificate.
                    Box::pin(async { Ok(vec!["garbage".to_string(), "more garbage".to_string()]) })
                }
            }
            fn describe(&self) -> String {
                "fail-after-first".into()
            }
        }
        let ca = Arc::new(FailAfterFirst {
            ca: DevCa::new_root("cluster.local").unwrap(),
            calls: AtomicUsize::new(0),
        });
        let (m, mut rx) = IdentityManager::start(
            ca.clone(),
            Duration::from_secs(1000),
            gw(),
            Arc::new(Metrics::new()),
            Clock::new(),
        );
        rx.changed().await.unwrap();
        let serial = rx.borrow_and_update().certs[&gw().id].leaf.serial.clone();
        tokio::time::sleep(Duration::from_secs(500)).await;
        settle().await;
        assert!(ca.calls.load(Ordering::SeqCst) >= 2);
        assert!(
            !rx.has_changed().unwrap(),
            "bad chain must not be published"
        );
        assert_eq!(rx.borrow().certs[&gw().id].leaf.serial, serial);
        assert_eq!(
            m.state(&gw().id),
            Some(State::Available),
            "still valid, still served"
        );
        let v = m.view();
        assert!(
            v["identities"][0]["last_error"]
                .as_str()
                .unwrap()
                .contains("rejected certificate")
        );
    }

    /// An istiod-faithful failure: the first certificate is issued, then every renewal answers
    /// UNAUTHENTICATED (e.g. the token's audience was changed). Retries must close in on NotAfter
    /// instead of waiting the 150 s backoff, and at NotAfter the identity must say it is unusable.
    #[tokio::test(start_paused = true)]
    async fn retries_before_expiry_and_tells_the_truth_at_expiry() {
        struct RefuseAfterFirst {
            ca: DevCa,
            calls: AtomicUsize,
        }
        impl CaBackend for RefuseAfterFirst {
            fn sign(&self, req: SignRequest) -> BoxFuture<'_, Result<Vec<String>, CaError>> {
                if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    self.ca.sign(req)
                } else {
                    Box::pin(async {
                        Err(CaError::new(
                            Code::Unauthenticated,
                            "token audience mismatch",
                        ))
                    })
                }
            }
            fn describe(&self) -> String {
                "refuse-after-first".into()
            }
        }
        let ca = Arc::new(RefuseAfterFirst {
            ca: DevCa::new_root("cluster.local").unwrap(),
            calls: AtomicUsize::new(0),
        });
        let metrics = Arc::new(Metrics::new());
        let clock = Clock::new();
        let (m, mut rx) = IdentityManager::start(
            ca.clone(),
            Duration::from_secs(60),
            gw(),
            metrics.clone(),
            clock,
        );
        rx.changed().await.unwrap();
        let not_after = rx.borrow_and_update().certs[&gw().id].not_after();
        assert!(m.is_ready());
        // Just before NotAfter: several retries already happened (the old code waited 150 s after
        // the first failure, far past expiry), and the still-valid certificate is Available.
        let before = not_after.duration_since(clock.now()).unwrap() - Duration::from_millis(700);
        tokio::time::sleep(before).await;
        settle().await;
        let calls = ca.calls.load(Ordering::SeqCst);
        assert!(calls >= 5, "only {calls} CA calls before expiry");
        assert_eq!(m.state(&gw().id), Some(State::Available));
        assert!(m.readiness().is_ok());
        // Past NotAfter, with no CA answer in between: Unavailable, not ready, and counted.
        tokio::time::sleep(Duration::from_millis(800)).await;
        settle().await;
        assert!(
            matches!(m.state(&gw().id), Some(State::Unavailable(ref why)) if why.contains("expired")),
            "{:?}",
            m.state(&gw().id)
        );
        let why = m.readiness().unwrap_err();
        assert!(
            why.contains("expired") && why.contains("Unauthenticated"),
            "{why}"
        );
        assert!(
            m.view()["identities"][0]["state"]
                .as_str()
                .unwrap()
                .starts_with("Unavailable: certificate expired")
        );
        tokio::time::sleep(Duration::from_secs(30)).await;
        settle().await;
        let id = gw().id.to_string();
        let expired = metrics
            .value("winmesh_cert_expired_seconds_total", &[("identity", &id)])
            .unwrap_or(0.0);
        assert!(
            (20.0..=31.0).contains(&expired),
            "expired seconds {expired}"
        );
        assert_eq!(
            metrics.value("winmesh_cert_valid", &[("identity", &id)]),
            Some(0.0)
        );
        // Near and past expiry the CA keeps being asked, whatever the error class.
        let after = ca.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(200)).await;
        settle().await;
        assert!(ca.calls.load(Ordering::SeqCst) > after);
    }

    #[tokio::test(start_paused = true)]
    async fn extra_identities_come_and_go() {
        let ca = Arc::new(DevCa::new_root("cluster.local").unwrap());
        let (m, mut rx) = IdentityManager::start(
            ca,
            Duration::from_secs(1000),
            gw(),
            Arc::new(Metrics::new()),
            Clock::new(),
        );
        rx.changed().await.unwrap();
        let app = IdentitySpec {
            id: SpiffeId::parse("spiffe://cluster.local/ns/win/sa/app").unwrap(),
            token_file: None,
            minter: None,
        };
        m.set_identities(vec![app.clone()]);
        settle().await;
        assert!(rx.borrow_and_update().certs.contains_key(&app.id));
        assert_eq!(rx.borrow().roots_pem.len(), 1, "one shared root");
        m.set_identities(vec![]);
        assert!(!rx.borrow().certs.contains_key(&app.id));
        assert!(rx.borrow().certs.contains_key(&gw().id));
        let text = m.view().to_string();
        assert!(!text.contains("PRIVATE KEY"));
    }
}
