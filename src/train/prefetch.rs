//! One reader thread per rank: it reads the next batch of the rank's schedule from the corpus
//! while the current one computes (HDF5 serialises every call in a process anyway, so one
//! thread is all reading can use). The thread opens its own corpus handle; batches come back
//! in schedule order over a channel that holds one, so at most two batches wait in memory.
use crate::data::corpus::Corpus;
use anyhow::{Context, Result, anyhow};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;
use std::time::Instant;

/// Volumes of `subjects` concatenated `[b, X, Y, Z]`, reading into reused buffers.
/// `unreadable` is a test hook: reading that subject index fails as a corrupt one would.
pub fn read_subjects(
    corpus: &Corpus,
    subjects: &[usize],
    unreadable: Option<usize>,
    out: &mut Vec<f32>,
) -> Result<()> {
    let (mut raw, mut vol) = (Vec::new(), Vec::new());
    out.clear();
    for &s in subjects {
        if unreadable == Some(s) {
            let id = corpus.subject(s).map_or("?", |i| i.meta.id.as_str());
            return Err(anyhow!(
                "{}: subject {id} (index {s}) cannot be read (injected by MTX_TEST_UNREADABLE_SUBJECT)",
                corpus.path().display()
            ));
        }
        corpus.read_volume(s, &mut raw, &mut vol)?;
        out.extend_from_slice(&vol);
    }
    Ok(())
}

/// A batch from the reader: its subjects and their volumes.
pub struct Batch {
    pub subjects: Vec<usize>,
    pub volumes: Vec<f32>,
}

/// The reader thread of one schedule of batches.
pub struct Prefetch {
    rx: Option<Receiver<Result<Batch>>>,
    thread: Option<JoinHandle<()>>,
}

impl Prefetch {
    /// Starts reading `schedule` (corpus subject indices per step) from `path`.
    pub fn start(path: &Path, schedule: Vec<Vec<usize>>, unreadable: Option<usize>) -> Self {
        let (tx, rx) = sync_channel(1);
        let path = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("prefetch".into())
            .spawn(move || reader(path, schedule, unreadable, tx))
            .expect("cannot start the prefetch thread");
        Prefetch {
            rx: Some(rx),
            thread: Some(thread),
        }
    }

    /// The next batch and the seconds spent waiting for it.
    pub fn next(&self) -> Result<(Batch, f64)> {
        let t = Instant::now();
        let batch = self
            .rx
            .as_ref()
            .expect("receiver lives until drop")
            .recv()
            .context("the prefetch thread ended early")??;
        Ok((batch, t.elapsed().as_secs_f64()))
    }
}

fn reader(
    path: PathBuf,
    schedule: Vec<Vec<usize>>,
    unreadable: Option<usize>,
    tx: SyncSender<Result<Batch>>,
) {
    let corpus = match Corpus::open(&path) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    for subjects in schedule {
        let mut volumes = Vec::new();
        let r = read_subjects(&corpus, &subjects, unreadable, &mut volumes)
            .map(|()| Batch { subjects, volumes });
        let failed = r.is_err();
        // A closed channel means the loop stopped early: nothing more to read.
        if tx.send(r).is_err() || failed {
            return;
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        // Closing the channel first unblocks a reader waiting to send.
        drop(self.rx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
