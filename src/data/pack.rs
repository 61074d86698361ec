//! `pack`: subjects (manifest or folder) -> preprocessing on all cores -> one HDF5 corpus.
//! Workers preprocess in parallel; the calling thread writes subjects in input order through a
//! bounded reorder window, so memory stays at a few volumes per thread whatever the cohort.
//! The corpus appears only when complete; any failure leaves no file behind.
use crate::cli::PackArgs;
use crate::data::corpus::{CorpusHeader, CorpusWriter, SubjectMeta, affine_source_name};
use crate::data::manifest::{SubjectInput, missing_files, read_manifest, scan_dir};
use crate::data::preprocess::{PackParams, Prepared, prepare_subject};
use crate::io::{AtomicFile, file_checksum};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What a pack did, for the summary.
#[derive(Debug, Clone, Default)]
pub struct PackReport {
    pub out: PathBuf,
    pub written: usize,
    /// (subject, reason) of subjects left out under --skip-bad.
    pub skipped: Vec<(String, String)>,
    /// (subject, warning), in input order.
    pub warnings: Vec<(String, String)>,
    /// How many subjects took their affine from each header field.
    pub affine_sources: BTreeMap<&'static str, usize>,
    /// Summed worker time over written subjects (preprocessing + checksum).
    pub busy: Duration,
    pub wall: Duration,
    pub threads: usize,
    pub bytes: u64,
}

impl std::fmt::Display for PackReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.written.max(1) as f64;
        writeln!(
            f,
            "pack: wrote {} subject(s) to {} ({:.1} MB); skipped {}; {} warning(s)",
            self.written,
            self.out.display(),
            self.bytes as f64 / 1e6,
            self.skipped.len(),
            self.warnings.len()
        )?;
        writeln!(
            f,
            "pack: {:.3} s per volume on one thread, {:.3} s per volume wall ({:.1} s total, {} thread(s))",
            self.busy.as_secs_f64() / n,
            self.wall.as_secs_f64() / n,
            self.wall.as_secs_f64(),
            self.threads
        )?;
        let sources: Vec<String> = self
            .affine_sources
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        writeln!(f, "pack: affine source: {}", sources.join(", "))?;
        for (who, why) in &self.skipped {
            writeln!(f, "pack: skipped {who}: {why}")?;
        }
        Ok(())
    }
}

/// Entry point of `mtx-hpc pack`.
pub fn run(args: &PackArgs) -> Result<()> {
    let params = pack_params(args);
    let report = pack(args, |s: &SubjectInput| {
        prepare_subject(&s.image, s.segmentation.as_deref(), &params)
    })?;
    print!("{report}");
    Ok(())
}

fn pack_params(args: &PackArgs) -> PackParams {
    PackParams {
        spacing: args.spacing,
        grid: args.grid,
        align: args.align,
        normalise: args.normalise,
        volume: args.volume,
    }
}

/// Everything `pack` does, with the per-subject preprocessing passed in (tests pass a
/// synthetic one). Every check that needs no image runs before any preprocessing.
pub fn pack<F>(args: &PackArgs, prepare: F) -> Result<PackReport>
where
    F: Fn(&SubjectInput) -> Result<Prepared> + Sync,
{
    let started = Instant::now();
    check_args(args)?;
    let mut subjects = match (&args.manifest, &args.dir) {
        (Some(m), _) => read_manifest(m)?,
        (None, Some(d)) => scan_dir(d)?,
        (None, None) => bail!("pack needs --manifest CSV or --dir DIR"),
    };
    let out = AtomicFile::new(&args.out, args.force)?;
    let mut skipped = Vec::new();
    let missing = missing_files(&subjects);
    if !missing.is_empty() {
        let lines: Vec<String> = missing
            .iter()
            .map(|(i, why)| format!("subject {}: {why}", subjects[*i].label()))
            .collect();
        if !args.skip_bad {
            bail!(
                "{} subject(s) have missing files (use --skip-bad to pack the rest):\n  {}",
                missing.len(),
                lines.join("\n  ")
            );
        }
        let gone: HashMap<usize, String> = missing.into_iter().collect();
        let mut kept = Vec::with_capacity(subjects.len());
        for (i, s) in subjects.into_iter().enumerate() {
            match gone.get(&i) {
                Some(why) => skipped.push((s.label(), why.clone())),
                None => kept.push(s),
            }
        }
        subjects = kept;
        if subjects.is_empty() {
            bail!(
                "{}: every subject was skipped:\n  {}",
                args.out.display(),
                lines.join("\n  ")
            );
        }
    }
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("pack-{i}"))
        .build()
        .context("cannot start the worker threads")?;
    let header = CorpusHeader {
        params: pack_params(args),
        creation_command: creation_command(),
        val_fraction: args.val_fraction,
        split_seed: args.seed,
    };
    let mut writer = CorpusWriter::create(out, &args.out, header, subjects.len())?;
    let mut report = PackReport {
        out: args.out.clone(),
        skipped,
        threads,
        ..PackReport::default()
    };
    write_all(
        &pool,
        threads,
        &subjects,
        &mut writer,
        if args.skip_bad {
            OnFailure::Skip
        } else {
            OnFailure::Abort
        },
        &prepare,
        &mut report,
    )?;
    if writer.is_empty() {
        let lines: Vec<String> = report
            .skipped
            .iter()
            .map(|(w, y)| format!("{w}: {y}"))
            .collect();
        bail!(
            "{}: every subject failed:\n  {}",
            args.out.display(),
            lines.join("\n  ")
        );
    }
    report.written = writer.len();
    let path = writer.finish()?;
    report.bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
    report.wall = started.elapsed();
    Ok(report)
}

fn check_args(args: &PackArgs) -> Result<()> {
    if !(args.spacing.is_finite() && args.spacing > 0.0) {
        bail!(
            "--spacing must be a positive number of millimetres, got {}",
            args.spacing
        );
    }
    if !(0.0..=1.0).contains(&args.val_fraction) {
        bail!(
            "--val-fraction must be between 0 and 1, got {}",
            args.val_fraction
        );
    }
    if args.threads == Some(0) {
        bail!("--threads must be at least 1");
    }
    Ok(())
}

type Outcome = Result<(Prepared, String)>;

/// What a subject that fails to preprocess does to the pack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum OnFailure {
    Abort,
    Skip,
}

/// Runs the workers and writes results in input order. At most `2 * threads` subjects are in
/// flight (submitted and not yet written), which bounds memory.
fn write_all<F>(
    pool: &rayon::ThreadPool,
    threads: usize,
    subjects: &[SubjectInput],
    writer: &mut CorpusWriter,
    on_failure: OnFailure,
    prepare: &F,
    report: &mut PackReport,
) -> Result<()>
where
    F: Fn(&SubjectInput) -> Result<Prepared> + Sync,
{
    let n = subjects.len();
    let window = (2 * threads).max(2);
    let abort = AtomicBool::new(false);
    let bar = crate::progress::bar(n as u64, "pack");
    let (tx, rx) = mpsc::channel::<(usize, Outcome, Duration)>();
    let result = pool.in_place_scope_fifo(|scope| -> Result<()> {
        let submit = |k: usize| {
            let tx = tx.clone();
            let abort = &abort;
            scope.spawn_fifo(move |_| {
                if abort.load(Ordering::Relaxed) {
                    return;
                }
                let t = Instant::now();
                let outcome = work(&subjects[k], prepare);
                let _ = tx.send((k, outcome, t.elapsed()));
            });
        };
        let mut next_submit = 0;
        while next_submit < n.min(window) {
            submit(next_submit);
            next_submit += 1;
        }
        let mut pending: BTreeMap<usize, (Outcome, Duration)> = BTreeMap::new();
        let mut next_write = 0;
        while next_write < n {
            let (k, outcome, dt) = rx
                .recv()
                .map_err(|_| anyhow!("pack workers stopped unexpectedly"))?;
            pending.insert(k, (outcome, dt));
            while let Some((outcome, dt)) = pending.remove(&next_write) {
                let s = &subjects[next_write];
                match outcome {
                    Ok((prepared, checksum)) => {
                        for w in &prepared.warnings {
                            bar.suspend(|| eprintln!("warning: subject {}: {w}", s.label()));
                            report.warnings.push((s.label(), w.clone()));
                        }
                        *report
                            .affine_sources
                            .entry(affine_source_name(prepared.geometry.affine_source))
                            .or_default() += 1;
                        writer
                            .push(subject_meta(s, checksum), &prepared)
                            .inspect_err(|_| {
                                abort.store(true, Ordering::Relaxed);
                            })?;
                        report.busy += dt;
                    }
                    Err(e) if on_failure == OnFailure::Skip => {
                        let why = format!("{e:#}");
                        bar.suspend(|| eprintln!("skipping subject {}: {why}", s.label()));
                        report.skipped.push((s.label(), why));
                    }
                    Err(e) => {
                        abort.store(true, Ordering::Relaxed);
                        return Err(e.context(format!(
                            "subject {} ({}) failed (use --skip-bad to pack the others)",
                            s.label(),
                            s.image.display()
                        )));
                    }
                }
                bar.inc(1);
                next_write += 1;
                if next_submit < n {
                    submit(next_submit);
                    next_submit += 1;
                }
            }
        }
        Ok(())
    });
    bar.finish_and_clear();
    result
}

/// One subject's work on a worker thread. A panic in preprocessing becomes this subject's
/// error instead of taking the whole pack (and its reorder loop) down.
fn work<F>(s: &SubjectInput, prepare: &F) -> Outcome
where
    F: Fn(&SubjectInput) -> Result<Prepared> + Sync,
{
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> Outcome {
        let prepared = prepare(s)?;
        let checksum = file_checksum(&s.image)?;
        Ok((prepared, checksum))
    }))
    .unwrap_or_else(|_| {
        Err(anyhow!(
            "{}: preprocessing panicked (a bug: please report it)",
            s.image.display()
        ))
    })
}

fn subject_meta(s: &SubjectInput, checksum: String) -> SubjectMeta {
    SubjectMeta {
        id: s.id.clone(),
        session: s.session.clone().unwrap_or_default(),
        source_file: s.image_entry.clone(),
        source_checksum: checksum,
        age: s.age.map(|a| a as f32),
        sex: s.sex.clone().unwrap_or_default(),
        diagnosis: s.diagnosis.clone().unwrap_or_default(),
        site: s.site.clone().unwrap_or_default(),
    }
}

/// The command line as typed, with arguments that need it single-quoted.
fn creation_command() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:+@%".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
