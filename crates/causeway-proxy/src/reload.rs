//! Configuration reload without dropping requests: a role keeps its configured state (a gateway
//! with its route table) in a [`Reloadable`]; each request takes the current version once and
//! keeps it to the end, so a reload swaps what new requests see while requests in flight finish
//! on the version they started with. [`watch_files`] triggers reloads on SIGHUP or when a watched
//! file changes (polled: the routing files are few and small, and polling works the same on
//! every filesystem, including bind mounts of Kubernetes ConfigMaps where inotify misses updates).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use causeway_core::serve::Shutdown;

/// A value that can be replaced while readers hold the previous one.
pub struct Reloadable<T> {
    current: RwLock<Arc<T>>,
}

impl<T> Reloadable<T> {
    pub fn new(value: T) -> Self {
        Self {
            current: RwLock::new(Arc::new(value)),
        }
    }

    /// The current version; holders keep it alive across a reload.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn replace(&self, value: T) {
        *self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(value);
    }
}

/// What can make a file "changed": its modification time and length.
fn stamp(path: &PathBuf) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

/// Calls `reload` on SIGHUP and whenever one of `files` changes (checked every `poll`), until
/// `shutdown`. `reload` reports what happened (it keeps the old configuration on errors).
pub async fn watch_files(
    files: Vec<PathBuf>,
    poll: Duration,
    mut shutdown: Shutdown,
    mut reload: impl FnMut(&'static str) + Send,
) {
    #[cfg(unix)]
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut stamps: Vec<_> = files.iter().map(stamp).collect();
    loop {
        #[cfg(unix)]
        let signalled = async {
            match hangup.as_mut() {
                Some(hangup) => {
                    hangup.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let signalled = std::future::pending::<()>();
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = signalled => reload("SIGHUP"),
            _ = tokio::time::sleep(poll) => {
                let now: Vec<_> = files.iter().map(stamp).collect();
                if now != stamps {
                    stamps = now;
                    reload("a routing file changed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn readers_keep_the_version_they_took() {
        let config = Reloadable::new("v1".to_string());
        let in_flight = config.current();
        config.replace("v2".to_string());
        assert_eq!(*in_flight, "v1");
        assert_eq!(*config.current(), "v2");
    }

    #[tokio::test]
    async fn a_changed_file_triggers_a_reload_and_an_unchanged_one_does_not() {
        let dir = std::env::temp_dir().join(format!("causeway-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("routes.yaml");
        std::fs::write(&file, "a").unwrap();
        let reloads = Arc::new(AtomicUsize::new(0));
        let (trigger, shutdown) = causeway_core::serve::shutdown_channel();
        let counter = reloads.clone();
        let watcher = tokio::spawn(watch_files(
            vec![file.clone()],
            Duration::from_millis(20),
            shutdown,
            move |_| {
                counter.fetch_add(1, Ordering::SeqCst);
            },
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(reloads.load(Ordering::SeqCst), 0, "nothing changed yet");
        // A different length is a change even within the filesystem's timestamp granularity.
        std::fs::write(&file, "abc").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while reloads.load(Ordering::SeqCst) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "no reload after the change"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        trigger.fire();
        watcher.await.unwrap();
        assert_eq!(reloads.load(Ordering::SeqCst), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
