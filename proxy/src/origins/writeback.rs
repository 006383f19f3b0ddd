//! Write-back: an image an upstream served because the hub lacked it is pushed into the hub under
//! its mapped name, so every other node gets hub hits and the upstream serves its bytes once per
//! cluster.
//!
//! - **What**: blobs first (a `HEAD`, then an upload from this node's cache), each manifest last,
//!   so the hub never holds a manifest whose blobs are missing (distribution refuses one anyway).
//!   An index goes in only once every child manifest this node holds went in, and only if it
//!   holds them all; the children it holds go in regardless. Everything is pushed **by digest,
//!   never by tag**: tags stay the upstream's and are re-validated on every pull (the hub answers
//!   tags first, so a written-back tag would freeze `latest` for the whole cluster); the hub holds
//!   the bytes.
//! - **Whose**: `hub.write_back: public` (the default) pushes only what the upstream serves
//!   without credentials (a client without `Authorization`, or the repository's public mark); `all`
//!   also private content, which then becomes readable by every client of every node (the hub is
//!   cluster-public, see the README); `off` pushes nothing.
//! - **When**: after the pull, in the background, never delaying or failing it: at most
//!   [`CONCURRENCY`] images at once, uploads under a byte rate. A job whose blobs this node does not
//!   have yet (the client is still pulling) waits and tries again. Jobs are records in the cache
//!   directory, so a restart picks them up; pushing the same image from two nodes at once is
//!   harmless (uploads of the same digest are idempotent).

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt as _;
use http_body::Frame;
use http_body_util::{BodyExt as _, StreamBody};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::{
    cache::{Cache, CacheError, MAX_RECORD_BYTES, READ_CHUNK, RecordDir},
    config::WriteBackPolicy as Policy,
    oci::{Digest, ManifestRefs, RepositoryName},
    origins::client::{BoxError, ProxyBody},
    origins::hub::HubError,
    origins::sources::HubSource,
    telemetry::unix_secs,
};

/// Images pushed at once.
pub(crate) const CONCURRENCY: usize = 2;
/// A job whose blobs are not all on this node yet (or whose hub cannot be reached) is tried again
/// this often...
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// ...this many times (about ten minutes), then dropped as incomplete.
const MAX_ATTEMPTS: u32 = 120;
/// A public mark younger than this lets `public` push content fetched with credentials.
const PUBLIC_MARK_FOR: u64 = 7 * 24 * 3600;

/// One image to push: a manifest (or index) of `repo` on `registry`, by digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Job {
    registry: String,
    repo: String,
    digest: String,
    /// The upstream served it to a client without credentials.
    anonymous: bool,
    attempts: u32,
}

impl Job {
    fn key(&self) -> String {
        format!("{}/{}@{}", self.registry, self.repo, self.digest)
    }
}

/// How a job ended (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Everything of it is in the hub now (some of it may have been there already).
    Pushed,
    /// The hub had all of it.
    AlreadyPresent,
    /// Private content under `public`.
    SkippedPrivate,
    /// An index of which this node holds only some platforms: those went in, the index did not.
    Partial,
    /// Its blobs never all reached this node.
    Incomplete,
    /// The hub refused or failed.
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Pushed => "pushed",
            Outcome::AlreadyPresent => "already_present",
            Outcome::SkippedPrivate => "skipped_private",
            Outcome::Partial => "partial",
            Outcome::Incomplete => "incomplete",
            Outcome::Failed => "failed",
        }
    }
}

/// The result of pushing one manifest.
enum Pushed {
    /// It (and its blobs) are in the hub; `true` if anything had to be sent.
    Done(bool),
    /// Some of its blobs are not on this node (yet).
    Missing,
}

#[derive(Debug, Default)]
struct Metrics {
    outcomes: Family<[(&'static str, &'static str); 1], Counter>,
    bytes: Counter,
    queued: Gauge,
}

/// The write-back queue and its workers.
pub(crate) struct WriteBack<H> {
    inner: Arc<Inner<H>>,
}

struct Inner<H> {
    hub: Arc<H>,
    cache: Arc<Cache>,
    policy: Policy,
    jobs: RecordDir<Job>,
    tx: mpsc::UnboundedSender<Job>,
    rate: RateLimit,
    metrics: Metrics,
    retry_after: Duration,
}

impl<H: HubSource> WriteBack<H> {
    /// Starts the workers, with the jobs a previous run left in `jobs`, pushing at most
    /// `rate_bytes` per second.
    pub(crate) fn start(
        hub: Arc<H>,
        cache: Arc<Cache>,
        policy: Policy,
        jobs: Jobs,
        rate_bytes: u64,
    ) -> Self {
        Self::start_with(hub, cache, policy, jobs, rate_bytes, RETRY_AFTER)
    }

    /// [`WriteBack::start`], with jobs that wait for their blobs trying again after
    /// `retry_after`.
    pub(crate) fn start_with(
        hub: Arc<H>,
        cache: Arc<Cache>,
        policy: Policy,
        Jobs(jobs): Jobs,
        rate_bytes: u64,
        retry_after: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            hub,
            cache,
            policy,
            jobs,
            tx,
            rate: RateLimit::new(rate_bytes),
            metrics: Metrics::default(),
            retry_after,
        });
        let resumed = inner.jobs.entries();
        if !resumed.is_empty() {
            info!(jobs = resumed.len(), "resuming write-back into the hub");
        }
        for (_, job) in resumed {
            inner.metrics.queued.inc();
            let _ = inner.tx.send(job);
        }
        tokio::spawn(dispatch(inner.clone(), rx));
        WriteBack { inner }
    }

    /// The upstream served manifest `digest` of `repo` on `registry` (to a client without
    /// credentials when `anonymous`) and the hub did not have it: push it, when the policy allows,
    /// once this node has its blobs.
    pub(crate) async fn offer(
        &self,
        registry: &str,
        repo: &RepositoryName,
        digest: &Digest,
        anonymous: bool,
    ) {
        let inner = &self.inner;
        if inner.policy == Policy::Off {
            return;
        }
        let job = Job {
            registry: registry.to_ascii_lowercase(),
            repo: repo.to_string(),
            digest: digest.to_string(),
            anonymous,
            attempts: 0,
        };
        let key = job.key();
        if inner.jobs.get(&key).is_some() {
            return;
        }
        if let Err(e) = inner.jobs.put(key, job.clone()).await {
            warn!(error = %e, "cannot record a write-back job; it is done now or never");
        }
        inner.metrics.queued.inc();
        let _ = inner.tx.send(job);
    }

    #[cfg(test)]
    /// Jobs waiting or running.
    pub(crate) fn pending(&self) -> i64 {
        self.inner.metrics.queued.get()
    }

    /// Registers the write-back metrics (names get the registry's `pullproxy_` prefix).
    pub(crate) fn register(&self, reg: &mut Registry) {
        let m = &self.inner.metrics;
        reg.register(
            "writebacks",
            "Images written back into the hub, by outcome: pushed, already_present, \
             skipped_private, partial (the platforms this node holds), incomplete (its blobs never \
             reached this node), failed",
            m.outcomes.clone(),
        );
        reg.register(
            "writeback_bytes",
            "Blob bytes uploaded into the hub by write-back",
            m.bytes.clone(),
        );
        reg.register(
            "writeback_queue",
            "Write-back jobs waiting or running",
            m.queued.clone(),
        );
    }
}

/// Runs jobs, [`CONCURRENCY`] at a time; a job that must wait is sent again later.
async fn dispatch<H: HubSource>(inner: Arc<Inner<H>>, mut rx: mpsc::UnboundedReceiver<Job>) {
    let slots = Arc::new(Semaphore::new(CONCURRENCY));
    while let Some(job) = rx.recv().await {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let inner = inner.clone();
        tokio::spawn(async move {
            let _permit = permit;
            run(&inner, job).await;
        });
    }
}

async fn run<H: HubSource>(inner: &Arc<Inner<H>>, mut job: Job) {
    let key = job.key();
    let result = match push_job(inner, &job).await {
        // The hub down or its credentials unreadable: later, like blobs still on their way.
        Err(PushError::Hub(HubError::Unreachable(_) | HubError::Credentials(_))) => Ok(None),
        other => other,
    };
    let outcome = match result {
        Ok(Some(outcome)) => outcome,
        Ok(None) if job.attempts + 1 < MAX_ATTEMPTS => {
            // Not all here yet: try again later (the record keeps the job across a restart).
            job.attempts += 1;
            let _ = inner.jobs.put(key, job.clone()).await;
            let (tx, after) = (inner.tx.clone(), inner.retry_after);
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                let _ = tx.send(job);
            });
            return;
        }
        Ok(None) => Outcome::Incomplete,
        Err(e) => {
            warn!(job = %key, error = %e, "write-back into the hub failed");
            Outcome::Failed
        }
    };
    match outcome {
        Outcome::Pushed | Outcome::Partial => {
            info!(job = %key, outcome = outcome.label(), "written back into the hub")
        }
        other => debug!(job = %key, outcome = other.label(), "write-back ended"),
    }
    inner
        .metrics
        .outcomes
        .get_or_create(&[("outcome", outcome.label())])
        .inc();
    inner.metrics.queued.dec();
    if let Err(e) = inner.jobs.remove(&key).await {
        warn!(job = %key, error = %e, "cannot remove a finished write-back job");
    }
}

/// Pushes one job; `Ok(None)`: some of its blobs are not on this node yet.
async fn push_job<H: HubSource>(inner: &Inner<H>, job: &Job) -> Result<Option<Outcome>, PushError> {
    let repo: RepositoryName = job.repo.parse().map_err(|_| PushError::BadJob)?;
    let digest: Digest = job.digest.parse().map_err(|_| PushError::BadJob)?;
    if inner.policy == Policy::Public && !job.anonymous {
        let public = inner
            .cache
            .repos()
            .public_since(&job.registry, &repo)
            .is_some_and(|at| unix_secs().saturating_sub(at) < PUBLIC_MARK_FOR);
        if !public {
            return Ok(Some(Outcome::SkippedPrivate));
        }
    }
    let host = job.registry.split(':').next().unwrap_or(&job.registry);
    let hub_repo = inner.hub.hub_repo(host, &repo)?;
    let hub_repo = hub_repo.as_str();
    let manifests = inner.cache.manifests();
    let Some(top) = manifests.get(&digest).await else {
        return Err(PushError::NotHere);
    };
    let refs = ManifestRefs::parse(&top.bytes);
    let children = refs.manifests();
    if children.is_empty() {
        return Ok(match push_manifest(inner, hub_repo, &digest).await? {
            Pushed::Done(true) => Some(Outcome::Pushed),
            Pushed::Done(false) => Some(Outcome::AlreadyPresent),
            Pushed::Missing => None,
        });
    }
    // An index: the children this node holds, then the index if it holds them all.
    let (mut sent, mut absent) = (false, 0);
    for child in &children {
        if manifests.get(child).await.is_none() {
            absent += 1;
            continue;
        }
        match push_manifest(inner, hub_repo, child).await? {
            Pushed::Done(s) => sent |= s,
            Pushed::Missing => return Ok(None),
        }
    }
    if absent > 0 {
        return Ok(Some(if sent {
            Outcome::Partial
        } else {
            Outcome::AlreadyPresent
        }));
    }
    Ok(match push_manifest(inner, hub_repo, &digest).await? {
        Pushed::Done(s) if s || sent => Some(Outcome::Pushed),
        Pushed::Done(_) => Some(Outcome::AlreadyPresent),
        Pushed::Missing => None,
    })
}

/// Pushes an image manifest's blobs that the hub lacks, then the manifest.
async fn push_manifest<H: HubSource>(
    inner: &Inner<H>,
    hub_repo: &str,
    digest: &Digest,
) -> Result<Pushed, PushError> {
    if inner.hub.has(hub_repo, "manifests", digest).await? {
        return Ok(Pushed::Done(false));
    }
    let manifest = inner
        .cache
        .manifests()
        .get(digest)
        .await
        .ok_or(PushError::NotHere)?;
    let blobs = ManifestRefs::parse(&manifest.bytes).blobs();
    // All of them here first: a job waits rather than pushing half an image now.
    let store = inner.cache.blobs().store();
    for blob in &blobs {
        if !matches!(store.open(blob).await, Ok(Some(_)))
            && !inner.hub.has(hub_repo, "blobs", blob).await?
        {
            return Ok(Pushed::Missing);
        }
    }
    for blob in &blobs {
        if inner.hub.has(hub_repo, "blobs", blob).await? {
            continue;
        }
        let Some(stored) = store.open(blob).await? else {
            return Ok(Pushed::Missing);
        };
        let len = stored.len;
        inner
            .hub
            .upload_blob(hub_repo, blob, len, rate_limited_body(stored, inner))
            .await?;
    }
    inner
        .hub
        .put_manifest(
            hub_repo,
            digest,
            &manifest.media_type,
            manifest.bytes.clone(),
        )
        .await?;
    Ok(Pushed::Done(true))
}

/// A cached blob as an upload body, read in chunks at the write-back rate.
fn rate_limited_body<H>(stored: crate::cache::StoredBlob, inner: &Inner<H>) -> ProxyBody {
    let rate = inner.rate.clone();
    let bytes = inner.metrics.bytes.clone();
    let len = stored.len;
    let chunks = futures_util::stream::unfold(0u64, move |offset| {
        let content = stored.content.clone();
        let rate = rate.clone();
        let bytes = bytes.clone();
        async move {
            if offset >= len {
                return None;
            }
            let want = (len - offset).min(READ_CHUNK as u64) as usize;
            rate.take(want as u64).await;
            let chunk = match content.read_at(offset, want).await {
                Ok(c) if !c.is_empty() => c,
                Ok(_) => {
                    return Some((Err(BoxError::from("the cached blob ended early")), u64::MAX));
                }
                Err(e) => return Some((Err(BoxError::from(e)), u64::MAX)),
            };
            bytes.inc_by(chunk.len() as u64);
            let next = offset + chunk.len() as u64;
            Some((Ok(Frame::data(chunk)), next))
        }
    });
    StreamBody::new(chunks.boxed()).boxed_unsync()
}

/// Why a write-back failed.
#[derive(Debug, thiserror::Error)]
enum PushError {
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("the manifest is no longer in this node's cache")]
    NotHere,
    #[error("a malformed job record")]
    BadJob,
    #[error(transparent)]
    Mapping(#[from] crate::origins::hub::MappingError),
}

/// A byte rate shared by every upload (a token bucket refilled continuously).
#[derive(Clone)]
struct RateLimit {
    per_second: u64,
    state: Arc<tokio::sync::Mutex<(f64, tokio::time::Instant)>>,
}

impl RateLimit {
    fn new(per_second: u64) -> Self {
        Self {
            per_second: per_second.max(1),
            state: Arc::new(tokio::sync::Mutex::new((
                per_second as f64,
                tokio::time::Instant::now(),
            ))),
        }
    }

    /// Waits until `n` bytes may be sent.
    async fn take(&self, n: u64) {
        let mut state = self.state.lock().await;
        let (tokens, since) = &mut *state;
        let now = tokio::time::Instant::now();
        let rate = self.per_second as f64;
        *tokens = (*tokens + now.duration_since(*since).as_secs_f64() * rate).min(rate);
        *since = now;
        *tokens -= n as f64;
        if *tokens < 0.0 {
            // Held while sleeping: the uploads share the rate in turn.
            tokio::time::sleep(Duration::from_secs_f64(-*tokens / rate)).await;
        }
    }
}

/// Where write-back jobs are kept between runs.
pub(crate) struct Jobs(RecordDir<Job>);

impl Jobs {
    /// `writeback/` in the cache directory (blocking).
    pub(crate) fn open(cache_dir: &std::path::Path) -> Result<Self, CacheError> {
        RecordDir::open(
            cache_dir.join("writeback"),
            cache_dir.join("tmp"),
            MAX_RECORD_BYTES,
        )
        .map(Jobs)
    }

    #[cfg(test)]
    /// Jobs kept in memory only (tests).
    pub(crate) fn in_memory() -> Self {
        Jobs(RecordDir::in_memory(MAX_RECORD_BYTES))
    }
}
