//! Watching one file: OS notifications (the `notify` crate: inotify on Linux, ReadDirectoryChangesW on
//! Windows) on the file's directory, plus a slow metadata poll as a safety net, and a quiet period
//! before a change is reported.
//!
//! Why the directory and not the file: editors and `kubectl cp` replace files by rename, and the
//! kubelet updates a ConfigMap volume by swapping its `..data` symlink; a watch on the old file would
//! see none of that. Why a poll as well: notifications can be lost (inotify queue overflow, network
//! file systems, Windows missing renames from other directories, envoy#30016). The poll only reads
//! metadata (size, modification time, and on Unix the inode), so a large file costs nothing while it
//! does not change. Why a quiet period: a file being written in several steps (a shell redirect, a
//! slow copy) produces a burst of changes; it is read only once it has been quiet for `settle`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use notify::{RecursiveMode, Watcher};
use tokio::sync::watch;
use tracing::{debug, warn};

/// What is compared to notice a change without reading the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fingerprint {
    len: u64,
    modified: Option<SystemTime>,
    /// Device and inode: a rename into place changes them even when size and time agree.
    #[cfg(unix)]
    inode: (u64, u64),
}

/// The file's current fingerprint (following symlinks, as reading does).
pub fn fingerprint(path: &Path) -> std::io::Result<Fingerprint> {
    let m = std::fs::metadata(path)?;
    #[cfg(unix)]
    let inode = {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    };
    Ok(Fingerprint {
        len: m.len(),
        modified: m.modified().ok(),
        #[cfg(unix)]
        inode,
    })
}

/// A watched file. [`FileWatch::changed`] resolves when the file may have changed and has been quiet
/// for the settle period.
pub struct FileWatch {
    path: PathBuf,
    settle: Duration,
    poll: Duration,
    /// Notification count and when the latest arrived.
    events: watch::Receiver<(u64, Option<Instant>)>,
    events_tx: watch::Sender<(u64, Option<Instant>)>,
    watcher: Option<notify::RecommendedWatcher>,
    last: Option<std::io::Result<Fingerprint>>,
}

fn same(a: &Option<std::io::Result<Fingerprint>>, b: &std::io::Result<Fingerprint>) -> bool {
    match (a, b) {
        (Some(Ok(x)), Ok(y)) => x == y,
        (Some(Err(x)), Err(y)) => x.kind() == y.kind(),
        _ => false,
    }
}

impl FileWatch {
    pub fn new(path: &Path, settle: Duration, poll: Duration) -> FileWatch {
        let (events_tx, events) = watch::channel((0u64, None));
        let mut w = FileWatch {
            path: path.to_path_buf(),
            settle,
            poll,
            events,
            events_tx,
            watcher: None,
            last: None,
        };
        w.arm();
        w
    }

    /// Whether OS notifications are active (otherwise only the poll notices changes).
    pub fn notifications(&self) -> bool {
        self.watcher.is_some()
    }

    /// Sets up the OS watch on the file's directory if it is not set up yet (the directory may
    /// appear later; the poll retries).
    fn arm(&mut self) {
        if self.watcher.is_some() {
            return;
        }
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let tx = self.events_tx.clone();
        let made = notify::recommended_watcher(move |r: notify::Result<notify::Event>| {
            if r.is_err() {
                // An error (e.g. queue overflow) may hide a change: treat it as one.
                debug!("file watch reported an error; checking the file");
            }
            tx.send_modify(|(n, at)| {
                *n = n.wrapping_add(1);
                *at = Some(Instant::now());
            });
        });
        match made {
            Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => self.watcher = Some(w),
                Err(e) => {
                    debug!(dir = %dir.display(), error = %e, "cannot watch directory; polling only")
                }
            },
            Err(e) => warn!(error = %e, "file notifications unavailable; polling only"),
        }
    }

    /// Waits for the first read: only the quiet period (a file being written as winmesh starts).
    pub async fn initial(&mut self) {
        self.settle().await;
    }

    /// Waits until the file may have changed since the last return, then until it has been quiet.
    pub async fn changed(&mut self) {
        loop {
            tokio::select! {
                r = self.events.changed() => {
                    if r.is_err() {
                        // Cannot happen while we hold the sender; fall back to the poll.
                        tokio::time::sleep(self.poll).await;
                    }
                }
                _ = tokio::time::sleep(self.poll) => {
                    self.arm();
                    if same(&self.last, &fingerprint(&self.path)) {
                        continue;
                    }
                }
            }
            self.settle().await;
            return;
        }
    }

    /// Returns once no notification arrived and the fingerprint stayed the same for `settle`, counted
    /// from the *last* notification (a burst of events from one save costs one quiet period, not one
    /// per event).
    async fn settle(&mut self) {
        loop {
            let before = fingerprint(&self.path);
            let last_event = self.events.borrow_and_update().1;
            let since = last_event.map_or(Duration::ZERO, |t| t.elapsed());
            let wait = self.settle.saturating_sub(since);
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
            let after = fingerprint(&self.path);
            let latest = self.events.borrow().1;
            let quiet = latest == last_event || latest.is_none_or(|t| t.elapsed() >= self.settle);
            if quiet && same(&Some(before), &after) {
                self.last = Some(after);
                return;
            }
        }
    }

    /// Whether the file changed since the last quiet point (call after reading it: a change during
    /// the read means the content may be torn).
    pub fn moved_since_settled(&self) -> bool {
        !same(&self.last, &fingerprint(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn notices_a_rename_into_place_and_waits_for_quiet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("mesh.yaml");
        std::fs::write(&p, "a").expect("write");
        // A long poll: only notifications can wake it quickly.
        let mut w = FileWatch::new(&p, Duration::from_millis(30), Duration::from_secs(3600));
        assert!(w.notifications(), "inotify works here");
        w.initial().await;
        let tmp = dir.path().join(".mesh.yaml.tmp");
        std::fs::write(&tmp, "bb").expect("write");
        std::fs::rename(&tmp, &p).expect("rename");
        tokio::time::timeout(Duration::from_secs(10), w.changed())
            .await
            .expect("rename noticed");
        assert!(!w.moved_since_settled());
        assert_eq!(std::fs::read_to_string(&p).expect("read"), "bb");
    }

    #[tokio::test]
    async fn the_poll_notices_what_notifications_missed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("mesh.yaml");
        std::fs::write(&p, "a").expect("write");
        let mut w = FileWatch::new(&p, Duration::from_millis(10), Duration::from_millis(50));
        // Simulate lost notifications.
        w.watcher = None;
        w.initial().await;
        std::fs::write(&p, "bbbb").expect("write");
        tokio::time::timeout(Duration::from_secs(10), w.changed())
            .await
            .expect("poll noticed");
    }

    #[tokio::test]
    async fn a_slow_writer_is_read_only_after_it_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("mesh.yaml");
        std::fs::write(&p, "").expect("write");
        let mut w = FileWatch::new(&p, Duration::from_millis(200), Duration::from_secs(3600));
        w.initial().await;
        let writer = {
            let p = p.clone();
            tokio::spawn(async move {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .append(true)
                    .open(&p)
                    .expect("open");
                for i in 0..10 {
                    writeln!(f, "line{i}: x").expect("write");
                    tokio::time::sleep(Duration::from_millis(40)).await;
                }
            })
        };
        tokio::time::timeout(Duration::from_secs(10), w.changed())
            .await
            .expect("change noticed");
        assert!(writer.is_finished(), "reported while still being written");
        assert_eq!(
            std::fs::read_to_string(&p).expect("read").lines().count(),
            10
        );
    }
}
