//! The MEVP target cache on disk. While the encoder is frozen, a subject's slice vectors
//! never change, so MEVP computes them once and keeps them in the run folder:
//!
//! ```text
//! RUN_DIR/mevp-cache/<corpus8>-<encoder8>/<subject>.bin
//! ```
//!
//! keyed by the corpus checksum and the encoder checksum (BLAKE3 of the encoder part of the
//! parameter buffer as little-endian f32 bytes), first 8 hex digits of each in the folder name
//! and both in full in every file's header, which a reader checks. Later epochs, validation
//! and resumed runs read the files instead of running the encoder; the values are the f32
//! vectors bit for bit, so results do not change.
//!
//! Each file is written through [`AtomicFile`] (temporary name, fsync, rename), so a crash
//! never leaves a torn file under a real name, and several processes (MPI ranks) may write
//! into the same folder at once: they only ever rename complete files into place, and two
//! writers of one subject write the same bytes. A file that does not read back as expected
//! counts as missing and is rewritten. When a process first uses a key, folders of other keys
//! are removed (they belong to an encoder that no longer exists in this run).
//!
//! File layout (little-endian): magic `MTXMEVP1`, u32 key length, the key (`corpus
//! checksum-encoder checksum`, hex), u64 subject, u32 D, u32 slices of each plane (axial,
//! sagittal, coronal), then the vectors as f32 `[slices, D]` plane after plane.
use crate::io::AtomicFile;
use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"MTXMEVP1";

/// The folder under the run folder that holds one subfolder per key.
pub const DIR: &str = "mevp-cache";

/// Per-plane vectors of one subject, `[slices, D]` each.
pub type Vectors = [Vec<f32>; 3];

/// Which key folder this process uses, and what it has read and written.
#[derive(Debug, Default)]
pub struct TargetCache {
    /// The key folder in use; older keys were pruned when it was first chosen.
    current: Option<PathBuf>,
    /// Subjects read from files.
    pub hits: u64,
    /// Subjects computed and written.
    pub writes: u64,
    /// A warning about a cache that cannot be used was printed (once per process).
    warned: bool,
}

/// The full key of (corpus, encoder): both checksums in hex.
pub fn key(corpus_checksum: &str, encoder: &[f32]) -> String {
    let mut h = blake3::Hasher::new();
    for v in encoder {
        h.update(&v.to_le_bytes());
    }
    format!("{corpus_checksum}-{}", h.finalize().to_hex())
}

/// The folder name of a key: 8 hex digits of each checksum.
fn folder_name(key: &str) -> String {
    let (corpus, encoder) = key.split_once('-').unwrap_or((key, ""));
    let short = |s: &str| s.chars().take(8).collect::<String>();
    format!("{}-{}", short(corpus), short(encoder))
}

/// Whether a folder name looks like one of ours (so pruning never removes anything else).
fn is_key_folder(name: &str) -> bool {
    let hex = |s: &str| s.len() == 8 && s.bytes().all(|b| b.is_ascii_hexdigit());
    name.split_once('-').is_some_and(|(a, b)| hex(a) && hex(b))
}

fn file_of(folder: &Path, subject: usize) -> PathBuf {
    folder.join(format!("{subject}.bin"))
}

fn header(key: &str, subject: usize, d: usize, counts: [usize; 3]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 4 + key.len() + 8 + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(key.len() as u32).to_le_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&(subject as u64).to_le_bytes());
    out.extend_from_slice(&(d as u32).to_le_bytes());
    for c in counts {
        out.extend_from_slice(&(c as u32).to_le_bytes());
    }
    out
}

impl TargetCache {
    /// Forgets the key folder in use (a new stage may have a new encoder); the next
    /// [`TargetCache::folder`] chooses it again.
    pub fn clear(&mut self) {
        self.current = None;
    }

    /// The folder for `key` under `run_dir`, created if needed. The first time this process
    /// uses a key, folders of other keys are removed (errors there are ignored: another rank
    /// may be removing the same folder).
    pub fn folder(&mut self, run_dir: &Path, key: &str) -> Result<PathBuf> {
        let root = run_dir.join(DIR);
        let folder = root.join(folder_name(key));
        if self.current.as_deref() == Some(folder.as_path()) {
            return Ok(folder);
        }
        std::fs::create_dir_all(&folder)
            .with_context(|| format!("{}: cannot create the cache folder", folder.display()))?;
        if let Ok(entries) = std::fs::read_dir(&root) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.path() != folder && is_key_folder(&name) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        self.current = Some(folder.clone());
        Ok(folder)
    }

    /// The vectors of `subject` when its file holds exactly what is asked (same key, subject,
    /// D and slice counts); `None` when it is missing or anything differs.
    pub fn read(
        &mut self,
        folder: &Path,
        key: &str,
        subject: usize,
        d: usize,
        counts: [usize; 3],
    ) -> Option<Vectors> {
        let bytes = std::fs::read(file_of(folder, subject)).ok()?;
        let head = header(key, subject, d, counts);
        let body = bytes.strip_prefix(head.as_slice())?;
        if body.len() != counts.iter().sum::<usize>() * d * 4 {
            return None;
        }
        let mut floats = body
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let out = counts.map(|n| floats.by_ref().take(n * d).collect());
        self.hits += 1;
        Some(out)
    }

    /// Writes the vectors of `subject` atomically (replacing any file of that name).
    pub fn write(
        &mut self,
        folder: &Path,
        key: &str,
        subject: usize,
        d: usize,
        vectors: [&[f32]; 3],
    ) -> Result<()> {
        let counts = vectors.map(|v| v.len() / d.max(1));
        let mut bytes = header(key, subject, d, counts);
        for v in vectors {
            bytes.reserve(v.len() * 4);
            for x in v {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        let target = file_of(folder, subject);
        let file = AtomicFile::new(&target, true)?;
        std::fs::File::create(file.path())
            .and_then(|mut f| f.write_all(&bytes))
            .with_context(|| format!("{}: write failed", file.path().display()))?;
        file.commit()?;
        self.writes += 1;
        Ok(())
    }

    /// Says once per process that the cache cannot be used, and why; training goes on
    /// computing the targets.
    pub fn warn(&mut self, err: &anyhow::Error) {
        if !self.warned {
            self.warned = true;
            eprintln!("warning: MEVP target cache off: {err:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vectors(subject: usize, d: usize, counts: [usize; 3]) -> Vectors {
        let mut k = 0;
        counts.map(|n| {
            k += 1;
            (0..n * d)
                .map(|i| (subject * 1000 + k * 100) as f32 + i as f32 * 0.25)
                .collect()
        })
    }

    #[test]
    fn round_trip_and_every_mismatch_is_a_miss() {
        let dir = tempfile::tempdir().unwrap();
        let (d, counts) = (4, [3, 2, 5]);
        let k = key("ab12cd34ef", &[1.0, 2.0]);
        let mut c = TargetCache::default();
        let f = c.folder(dir.path(), &k).unwrap();
        assert_eq!(f, dir.path().join(DIR).join(folder_name(&k)));
        assert!(c.read(&f, &k, 7, d, counts).is_none());
        let v = vectors(7, d, counts);
        c.write(&f, &k, 7, d, v.each_ref().map(|v| v.as_slice()))
            .unwrap();
        assert_eq!(c.read(&f, &k, 7, d, counts), Some(v));
        assert_eq!((c.hits, c.writes), (1, 1));
        // Another key with the same folder name, D, counts or subject: misses.
        let other = format!("{k}0");
        assert_eq!(folder_name(&other), folder_name(&k));
        assert!(c.read(&f, &other, 7, d, counts).is_none());
        assert!(c.read(&f, &k, 7, 2, counts).is_none());
        assert!(c.read(&f, &k, 7, d, [3, 2, 4]).is_none());
        std::fs::copy(file_of(&f, 7), file_of(&f, 8)).unwrap();
        assert!(c.read(&f, &k, 8, d, counts).is_none());
        // A short file: a miss.
        let bytes = std::fs::read(file_of(&f, 7)).unwrap();
        std::fs::write(file_of(&f, 7), &bytes[..bytes.len() - 4]).unwrap();
        assert!(c.read(&f, &k, 7, d, counts).is_none());
        // Only the complete files are in the folder: no temporary left behind.
        let names: Vec<String> = std::fs::read_dir(&f)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.ends_with(".bin")), "{names:?}");
    }

    #[test]
    fn a_new_key_removes_old_key_folders_only() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (key("11111111aa", &[1.0]), key("11111111aa", &[2.0]));
        assert_ne!(folder_name(&a), folder_name(&b));
        let mut c = TargetCache::default();
        let fa = c.folder(dir.path(), &a).unwrap();
        c.write(&fa, &a, 0, 1, [&[1.0], &[2.0], &[3.0]]).unwrap();
        let keep = dir.path().join(DIR).join("notes");
        std::fs::create_dir_all(&keep).unwrap();
        // The same key again: nothing removed.
        let mut again = TargetCache::default();
        assert_eq!(again.folder(dir.path(), &a).unwrap(), fa);
        assert!(fa.join("0.bin").exists());
        let fb = c.folder(dir.path(), &b).unwrap();
        assert!(fb.is_dir() && !fa.exists() && keep.is_dir());
    }

    /// Four writers (as MPI ranks would) fill one folder at once, with overlapping subjects:
    /// every file reads back whole and right, and nothing else is left in the folder.
    #[test]
    fn concurrent_writers_leave_only_complete_files() {
        let dir = tempfile::tempdir().unwrap();
        let (d, counts) = (8, [5, 6, 7]);
        let k = key("cafef00d00", &[0.5; 10]);
        std::thread::scope(|s| {
            for w in 0..4 {
                let (root, k) = (dir.path(), &k);
                s.spawn(move || {
                    let mut c = TargetCache::default();
                    let f = c.folder(root, k).unwrap();
                    for round in 0..3 {
                        for subject in (w * 5..w * 5 + 10).rev() {
                            let v = vectors(subject, d, counts);
                            c.write(&f, k, subject, d, v.each_ref().map(|v| v.as_slice()))
                                .unwrap();
                            if round > 0 {
                                // Whatever another writer renamed in is a whole file.
                                assert_eq!(c.read(&f, k, subject, d, counts), Some(v));
                            }
                        }
                    }
                });
            }
        });
        let mut c = TargetCache::default();
        let f = c.folder(dir.path(), &k).unwrap();
        for subject in 0..25 {
            assert_eq!(
                c.read(&f, &k, subject, d, counts),
                Some(vectors(subject, d, counts)),
                "subject {subject}"
            );
        }
        assert_eq!(std::fs::read_dir(&f).unwrap().count(), 25);
    }
}
