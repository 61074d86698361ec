//! `mtx-hpc report`: gathers the `metrics.json` of every fine-tuning run below some folders
//! into one Markdown and one CSV table, draws SVG plots of each task's main metric against
//! the label fraction, and, given the grid file, names the cells that are missing or failed.
//!
//! Also the file formats the grid runs share (docs/DOWNSTREAM.md): `metrics.json`
//! ([`MetricsFile`]), the grid file ([`Grid`]) and the failed-cell marker `failed.txt`.
use super::metrics::{MetricSet, bootstrap_ci};
use super::{Init, Task};
use anyhow::{Context, Result, bail};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The `format` field of every `metrics.json` this version writes and reads.
pub const METRICS_FORMAT: &str = "mtx-hpc metrics 1";
/// A finished cell's results.
pub const METRICS_FILE: &str = "metrics.json";
/// The marker a failed cell leaves where `metrics.json` would be.
pub const FAILED_FILE: &str = "failed.txt";

/// `metrics.json`: one fine-tuning run (one grid cell) and its test metrics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsFile {
    /// Always [`METRICS_FORMAT`].
    pub format: String,
    pub task: Task,
    /// Test fold, 0-based, below `folds`.
    pub fold: usize,
    /// Number of folds K.
    pub folds: usize,
    /// Label fraction of the training part, in (0, 1].
    pub fraction: f64,
    pub seed: u64,
    pub init: Init,
    /// BLAKE3 of the pretraining checkpoint read (null for scratch).
    pub checkpoint_checksum: Option<String>,
    /// BLAKE3 of the corpus.
    pub corpus_checksum: String,
    pub tool_version: String,
    /// Parameters updated by fine-tuning (fewer than the total with --freeze-encoder).
    pub params_trained: u64,
    pub params_total: u64,
    #[serde(flatten)]
    pub results: MetricSet,
}

impl MetricsFile {
    /// The cell this file answers.
    pub fn cell(&self) -> Cell {
        Cell {
            task: self.task,
            fold: self.fold,
            fraction: self.fraction,
            init: self.init,
            seed: self.seed,
        }
    }

    /// Checks the fields against each other; the error names the problem, not the file.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != METRICS_FORMAT {
            return Err(format!(
                "format is '{}', expected '{METRICS_FORMAT}'",
                self.format
            ));
        }
        if self.fold >= self.folds {
            return Err(format!(
                "fold {} is out of range for {} folds",
                self.fold, self.folds
            ));
        }
        super::check_fraction(self.fraction)?;
        if self.init == Init::Pretrained && self.checkpoint_checksum.is_none() {
            return Err("a pretrained run without checkpoint_checksum".into());
        }
        if self.params_trained > self.params_total {
            return Err(format!(
                "params_trained {} exceeds params_total {}",
                self.params_trained, self.params_total
            ));
        }
        self.results.validate()
    }

    /// Reads and validates a `metrics.json`; errors name the file.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let m: MetricsFile = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid metrics.json", path.display()))?;
        m.validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(m)
    }

    /// Writes it as pretty JSON, atomically.
    pub fn write(&self, path: &Path, overwrite: bool) -> Result<()> {
        self.validate()
            .map_err(|e| anyhow::anyhow!("{}: refusing to write: {e}", path.display()))?;
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        crate::io::write_atomic(path, text.as_bytes(), overwrite)
    }
}

// ---------------------------------------------------------------- grid file

/// One grid cell: a fine-tuning run to do.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cell {
    pub task: Task,
    pub fold: usize,
    pub fraction: f64,
    pub init: Init,
    pub seed: u64,
}

/// Fractions compare in millionths, so 0.5 from a grid file and from JSON are one key.
fn fraction_key(f: f64) -> u64 {
    (f * 1e6).round() as u64
}

fn fraction_text(key: u64) -> String {
    format!("{}", key as f64 / 1e6)
}

type CellKey = (Task, usize, u64, Init, u64);
/// (task, fraction key, initialisation): one row of the report.
type GroupKey = (Task, u64, Init);
/// Per metric name: the values and the count of nulls.
type GroupValues = BTreeMap<String, (Vec<f64>, usize)>;
/// Per (fold, seed): the main metric of [pretrained, scratch].
type PairSlots = BTreeMap<(usize, u64), [Option<f64>; 2]>;

impl Cell {
    fn key(&self) -> CellKey {
        (
            self.task,
            self.fold,
            fraction_key(self.fraction),
            self.init,
            self.seed,
        )
    }

    /// The folder a grid runner gives this cell below its output folder:
    /// `TASK/fraction-F/INIT/fold-K-seed-S`.
    pub fn relative_dir(&self) -> PathBuf {
        PathBuf::from(self.task.name())
            .join(format!("fraction-{}", self.fraction))
            .join(self.init.name())
            .join(format!("fold-{}-seed-{}", self.fold, self.seed))
    }

    /// Parses the five fields of a grid line (or the first line of `failed.txt`).
    pub fn parse(line: &str) -> Result<Cell, String> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "expected 5 fields (task fold fraction init seed), found {}",
                fields.len()
            ));
        }
        let task: Task = fields[0].parse()?;
        let fold: usize = fields[1]
            .parse()
            .map_err(|_| format!("fold '{}' is not a non-negative integer", fields[1]))?;
        let fraction: f64 = fields[2]
            .parse()
            .map_err(|_| format!("fraction '{}' is not a number", fields[2]))?;
        super::check_fraction(fraction)?;
        let init: Init = fields[3].parse()?;
        let seed: u64 = fields[4]
            .parse()
            .map_err(|_| format!("seed '{}' is not a non-negative integer", fields[4]))?;
        Ok(Cell {
            task,
            fold,
            fraction,
            init,
            seed,
        })
    }
}

impl std::fmt::Display for Cell {
    /// The grid-line form: `task fold fraction init seed`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {} {} {} {}",
            self.task, self.fold, self.fraction, self.init, self.seed
        )
    }
}

/// A grid file: one cell per line (`task fold fraction init seed`, whitespace separated),
/// `#` starting a comment, blank lines ignored. Cell N is the N-th cell line, from 0.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub path: PathBuf,
    /// (1-based line number, cell).
    pub cells: Vec<(usize, Cell)>,
}

impl Grid {
    pub fn read(path: &Path) -> Result<Grid> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read the grid file", path.display()))?;
        Grid::parse(&text, path)
    }

    /// Parses grid text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Grid> {
        let mut cells = Vec::new();
        let mut seen: BTreeMap<CellKey, usize> = BTreeMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let cell = Cell::parse(line)
                .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1))?;
            if let Some(first) = seen.insert(cell.key(), i + 1) {
                bail!(
                    "{} line {}: cell '{cell}' repeats line {first}",
                    path.display(),
                    i + 1
                );
            }
            cells.push((i + 1, cell));
        }
        if cells.is_empty() {
            bail!("{}: the grid file lists no cells", path.display());
        }
        Ok(Grid {
            path: path.to_path_buf(),
            cells,
        })
    }

    /// Cell `n` (0-based, e.g. SLURM_ARRAY_TASK_ID with `--array=0-(N-1)`).
    pub fn cell(&self, n: usize) -> Result<Cell> {
        match self.cells.get(n) {
            Some((_, c)) => Ok(*c),
            None => bail!(
                "{}: cell {n} is out of range: the grid has {} cells, numbered 0 to {}",
                self.path.display(),
                self.cells.len(),
                self.cells.len() - 1
            ),
        }
    }
}

/// Writes `failed.txt` in `dir`: the cell's grid line, then the error.
pub fn write_failed(dir: &Path, cell: &Cell, error: &str) -> Result<()> {
    let text = format!("{cell}\n{}\n", error.trim_end());
    crate::io::write_atomic(&dir.join(FAILED_FILE), text.as_bytes(), true)
}

/// Reads a `failed.txt`: (cell, error text).
pub fn read_failed(path: &Path) -> Result<(Cell, String)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let (first, rest) = text.split_once('\n').unwrap_or((&text, ""));
    let cell = Cell::parse(first.trim()).map_err(|e| {
        anyhow::anyhow!(
            "{}: the first line must be the failed cell (task fold fraction init seed): {e}",
            path.display()
        )
    })?;
    Ok((cell, rest.trim().to_string()))
}

// ---------------------------------------------------------------- gathering

/// What was found below the report's folders.
#[derive(Debug, Default)]
pub struct Found {
    pub runs: Vec<(PathBuf, MetricsFile)>,
    /// Failed markers without a metrics.json beside them: (path, cell, error).
    pub failed: Vec<(PathBuf, Cell, String)>,
    /// failed.txt beside a metrics.json (a later run succeeded): ignored, listed.
    pub stale_failed: Vec<PathBuf>,
}

fn walk(dir: &Path, found: &mut Found) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("{}: cannot list", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    let metrics = dir.join(METRICS_FILE);
    let failed = dir.join(FAILED_FILE);
    if metrics.is_file() {
        found
            .runs
            .push((metrics.clone(), MetricsFile::read(&metrics)?));
        if failed.is_file() {
            found.stale_failed.push(failed);
        }
    } else if failed.is_file() {
        let (cell, error) = read_failed(&failed)?;
        found.failed.push((failed, cell, error));
    }
    for e in entries {
        // Symbolic links are not followed below the named folders (no cycles).
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            walk(&e.path(), found)?;
        }
    }
    Ok(())
}

/// Every metrics.json and failed.txt below `dirs`; the same cell twice is an error.
pub fn gather(dirs: &[PathBuf]) -> Result<Found> {
    let mut found = Found::default();
    for d in dirs {
        if !d.is_dir() {
            bail!("{}: no such folder", d.display());
        }
        walk(d, &mut found)?;
    }
    let mut seen: BTreeMap<CellKey, &Path> = BTreeMap::new();
    for (path, m) in &found.runs {
        if let Some(first) = seen.insert(m.cell().key(), path) {
            bail!(
                "{}: cell '{}' is also reported by {}; remove one of them",
                path.display(),
                m.cell(),
                first.display()
            );
        }
    }
    if found.runs.is_empty() && found.failed.is_empty() {
        let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        bail!(
            "no {METRICS_FILE} or {FAILED_FILE} below {}",
            names.join(", ")
        );
    }
    // One fold count per task: fold k of a 5-fold and of a 3-fold split are different sets.
    let mut folds: BTreeMap<Task, (usize, &Path)> = BTreeMap::new();
    for (path, m) in &found.runs {
        let (k, first) = *folds.entry(m.task).or_insert((m.folds, path));
        if k != m.folds {
            bail!(
                "{}: {} uses {} folds but {} uses {k}; report one fold count per task",
                path.display(),
                m.task,
                m.folds,
                first.display()
            );
        }
    }
    Ok(found)
}

// ---------------------------------------------------------------- statistics

/// Mean and spread of one metric over a group of runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Runs with a value.
    pub n: usize,
    /// Runs where the metric is null.
    pub n_null: usize,
    pub mean: Option<f64>,
    /// Sample standard deviation (n - 1); None below 2 values.
    pub sd: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
}

fn summarise(values: &[f64], n_null: usize) -> Summary {
    let n = values.len();
    let mean = (n > 0).then(|| values.iter().sum::<f64>() / n as f64);
    let sd = (n > 1).then(|| {
        let m = mean.expect("n > 0");
        (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
    });
    Summary {
        n,
        n_null,
        mean,
        sd,
        min: values.iter().copied().reduce(f64::min),
        max: values.iter().copied().reduce(f64::max),
    }
}

/// The pretrained-minus-scratch difference of a task's main metric at one label fraction.
#[derive(Clone, Debug, PartialEq)]
pub struct Difference {
    pub task: Task,
    pub fraction: u64,
    /// (fold, seed) pairs with both values.
    pub pairs: usize,
    /// Cells of this task and fraction without a partner (or with a null main metric).
    pub unpaired: usize,
    pub summary: Summary,
    /// Percentile bootstrap 95% interval of the mean difference over pairs, or why none.
    pub ci: Result<(f64, f64), String>,
}

/// Everything the report shows.
#[derive(Debug)]
pub struct Report {
    /// (task, fraction key, init) -> metric name -> summary.
    pub groups: BTreeMap<GroupKey, BTreeMap<String, Summary>>,
    /// (task, init) -> distinct (trained, total) parameter counts.
    pub params: BTreeMap<(Task, Init), BTreeSet<(u64, u64)>>,
    pub differences: Vec<Difference>,
    pub found: Found,
    pub grid: Option<GridStatus>,
}

/// The grid's cells sorted by what became of them.
#[derive(Debug, Default)]
pub struct GridStatus {
    pub path: PathBuf,
    pub total: usize,
    pub done: usize,
    /// (cell number, line, cell).
    pub missing: Vec<(usize, usize, Cell)>,
    /// (cell number, line, cell, first line of the error, failed.txt).
    pub failed: Vec<(usize, usize, Cell, String, PathBuf)>,
    /// Runs found that the grid does not list.
    pub outside: Vec<(PathBuf, Cell)>,
}

/// Builds the report: summaries per (task, fraction, init), paired differences with a
/// bootstrap interval (`resamples` draws from `seed`), and the grid's status.
pub fn build(found: Found, grid: Option<&Grid>, resamples: usize, seed: u64) -> Result<Report> {
    let mut values: BTreeMap<GroupKey, GroupValues> = BTreeMap::new();
    let mut params: BTreeMap<(Task, Init), BTreeSet<(u64, u64)>> = BTreeMap::new();
    for (_, m) in &found.runs {
        let group = values
            .entry((m.task, fraction_key(m.fraction), m.init))
            .or_default();
        for (name, v) in &m.results.metrics {
            let e = group.entry(name.clone()).or_default();
            match v {
                Some(x) => e.0.push(*x),
                None => e.1 += 1,
            }
        }
        params
            .entry((m.task, m.init))
            .or_default()
            .insert((m.params_trained, m.params_total));
    }
    let groups = values
        .into_iter()
        .map(|(k, metrics)| {
            let s = metrics
                .into_iter()
                .map(|(name, (v, nulls))| (name, summarise(&v, nulls)))
                .collect();
            (k, s)
        })
        .collect();

    // Paired differences of the main metric by (fold, seed).
    let mut main: BTreeMap<(Task, u64), PairSlots> = BTreeMap::new();
    for (_, m) in &found.runs {
        let v = m
            .results
            .metrics
            .get(m.task.main_metric())
            .copied()
            .flatten();
        let slot = main
            .entry((m.task, fraction_key(m.fraction)))
            .or_default()
            .entry((m.fold, m.seed))
            .or_default();
        slot[(m.init == Init::Scratch) as usize] = v;
    }
    let mut differences = Vec::new();
    for ((task, fraction), cells) in main {
        let diffs: Vec<f64> = cells
            .values()
            .filter_map(|[p, s]| Some((*p)? - (*s)?))
            .collect();
        let unpaired = cells
            .values()
            .map(|[p, s]| match (p, s) {
                (Some(_), Some(_)) => 0,
                _ => p.is_some() as usize + s.is_some() as usize,
            })
            .sum();
        if diffs.is_empty() && unpaired == 0 {
            continue;
        }
        let ci = bootstrap_ci(diffs.len(), resamples, 0.95, seed, |idx| {
            Ok(idx.iter().map(|&i| diffs[i]).sum::<f64>() / idx.len() as f64)
        });
        differences.push(Difference {
            task,
            fraction,
            pairs: diffs.len(),
            unpaired,
            summary: summarise(&diffs, 0),
            ci,
        });
    }

    let grid = grid.map(|g| {
        let done: BTreeSet<CellKey> = found.runs.iter().map(|(_, m)| m.cell().key()).collect();
        let failed: BTreeMap<CellKey, (&Path, &str)> = found
            .failed
            .iter()
            .map(|(p, c, e)| (c.key(), (p.as_path(), e.as_str())))
            .collect();
        let mut st = GridStatus {
            path: g.path.clone(),
            total: g.cells.len(),
            ..Default::default()
        };
        for (n, (line, cell)) in g.cells.iter().enumerate() {
            if done.contains(&cell.key()) {
                st.done += 1;
            } else if let Some((path, err)) = failed.get(&cell.key()) {
                let first = err.lines().next().unwrap_or("(no message)").to_string();
                st.failed.push((n, *line, *cell, first, path.to_path_buf()));
            } else {
                st.missing.push((n, *line, *cell));
            }
        }
        let listed: BTreeSet<CellKey> = g.cells.iter().map(|(_, c)| c.key()).collect();
        st.outside = found
            .runs
            .iter()
            .filter(|(_, m)| !listed.contains(&m.cell().key()))
            .map(|(p, m)| (p.clone(), m.cell()))
            .collect();
        st
    });
    Ok(Report {
        groups,
        params,
        differences,
        found,
        grid,
    })
}

// ---------------------------------------------------------------- writing

/// A CSV number: at most 6 decimals, trailing zeros dropped (0.85, not 0.8500000000000001);
/// empty for none.
fn opt(v: Option<f64>) -> String {
    v.map(|x| {
        let s = format!("{x:.6}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" {
            "0".to_string()
        } else {
            s.to_string()
        }
    })
    .unwrap_or_default()
}

fn short(v: f64) -> String {
    format!("{v:.4}")
}

impl Report {
    /// Metric names in display order: the task's main metric first, then alphabetical.
    fn metric_names(&self, task: Task) -> Vec<String> {
        let mut names: BTreeSet<String> = BTreeSet::new();
        for ((t, _, _), m) in &self.groups {
            if *t == task {
                names.extend(m.keys().cloned());
            }
        }
        let mut out = Vec::new();
        if names.remove(task.main_metric()) {
            out.push(task.main_metric().to_string());
        }
        out.extend(names);
        out
    }

    fn tasks(&self) -> Vec<Task> {
        let t: BTreeSet<Task> = self.groups.keys().map(|k| k.0).collect();
        t.into_iter().collect()
    }

    /// The CSV table: one row per (task, fraction, init, metric), plus one row per (task,
    /// fraction) with init `pretrained-minus-scratch` for the paired difference.
    pub fn csv(&self) -> String {
        let mut out =
            String::from("task,fraction,init,metric,n,n_null,mean,sd,min,max,ci95_low,ci95_high\n");
        let row = |out: &mut String,
                   t: Task,
                   f: u64,
                   init: &str,
                   name: &str,
                   s: &Summary,
                   ci: Option<(f64, f64)>| {
            let _ = writeln!(
                out,
                "{t},{},{init},{name},{},{},{},{},{},{},{},{}",
                fraction_text(f),
                s.n,
                s.n_null,
                opt(s.mean),
                opt(s.sd),
                opt(s.min),
                opt(s.max),
                opt(ci.map(|c| c.0)),
                opt(ci.map(|c| c.1)),
            );
        };
        for task in self.tasks() {
            let names = self.metric_names(task);
            for ((t, f, init), metrics) in &self.groups {
                if *t != task {
                    continue;
                }
                for name in &names {
                    if let Some(s) = metrics.get(name) {
                        row(&mut out, task, *f, init.name(), name, s, None);
                    }
                }
            }
            for d in self.differences.iter().filter(|d| d.task == task) {
                row(
                    &mut out,
                    task,
                    d.fraction,
                    "pretrained-minus-scratch",
                    task.main_metric(),
                    &d.summary,
                    d.ci.as_ref().ok().copied(),
                );
            }
        }
        out
    }

    /// The Markdown report.
    pub fn markdown(&self, dirs: &[PathBuf]) -> String {
        let mut md = String::from("# Downstream evaluation report\n\n");
        let names: Vec<String> = dirs.iter().map(|d| format!("`{}`", d.display())).collect();
        let _ = writeln!(
            md,
            "Made by `mtx-hpc report` {} from {} finished runs and {} failed cells below {}. \
Values are mean ± sample standard deviation over folds and seeds (n runs with a value; \
null values counted apart). The difference is pretrained minus scratch of the task's main \
metric, paired by (fold, seed), with a percentile bootstrap 95% interval of its mean.\n",
            crate::TOOL_VERSION,
            self.found.runs.len(),
            self.found.failed.len(),
            names.join(", ")
        );
        for task in self.tasks() {
            let names = self.metric_names(task);
            let _ = writeln!(md, "## {task}\n");
            let _ = writeln!(
                md,
                "Main metric: `{}` ({} is better). Plot: [{task}.svg]({task}.svg)\n",
                task.main_metric(),
                if task.higher_is_better() {
                    "higher"
                } else {
                    "lower"
                }
            );
            let mut header = String::from("| fraction | init |");
            let mut rule = String::from("|---|---|");
            for n in &names {
                let _ = write!(header, " {n} |");
                rule.push_str("---|");
            }
            let _ = writeln!(md, "{header}\n{rule}");
            for ((t, f, init), metrics) in &self.groups {
                if *t != task {
                    continue;
                }
                let _ = write!(md, "| {} | {init} |", fraction_text(*f));
                for n in &names {
                    let cell = match metrics.get(n) {
                        None => "".to_string(),
                        Some(s) => {
                            let mut c = match (s.mean, s.sd) {
                                (Some(m), Some(sd)) => format!("{} ± {}", short(m), short(sd)),
                                (Some(m), None) => short(m),
                                _ => "null".into(),
                            };
                            let _ = write!(c, " (n={}", s.n);
                            if s.n_null > 0 {
                                let _ = write!(c, ", {} null", s.n_null);
                            }
                            c.push(')');
                            c
                        }
                    };
                    let _ = write!(md, " {cell} |");
                }
                md.push('\n');
            }
            md.push('\n');
            for ((t, init), counts) in &self.params {
                if *t == task {
                    let c: Vec<String> = counts
                        .iter()
                        .map(|(tr, tot)| format!("{tr} trained of {tot}"))
                        .collect();
                    let _ = writeln!(md, "Parameters ({init}): {}.  ", c.join("; "));
                }
            }
            let diffs: Vec<&Difference> =
                self.differences.iter().filter(|d| d.task == task).collect();
            if !diffs.is_empty() {
                let _ = writeln!(
                    md,
                    "\nPretrained minus scratch, `{}` ({} favours pretraining):\n\n| fraction | pairs | unpaired | mean difference | 95% CI |\n|---|---|---|---|---|",
                    task.main_metric(),
                    if task.higher_is_better() {
                        "positive"
                    } else {
                        "negative"
                    }
                );
                for d in diffs {
                    let mean = d.summary.mean.map(short).unwrap_or_else(|| "null".into());
                    let ci = match &d.ci {
                        Ok((lo, hi)) => format!("[{}, {}]", short(*lo), short(*hi)),
                        Err(reason) => format!("null ({reason})"),
                    };
                    let _ = writeln!(
                        md,
                        "| {} | {} | {} | {mean} | {ci} |",
                        fraction_text(d.fraction),
                        d.pairs,
                        d.unpaired
                    );
                }
            }
            md.push('\n');
        }
        if let Some(g) = &self.grid {
            let _ = writeln!(
                md,
                "## Grid `{}`\n\n{} cells: {} done, {} failed, {} missing.\n",
                g.path.display(),
                g.total,
                g.done,
                g.failed.len(),
                g.missing.len()
            );
            if !g.failed.is_empty() {
                md.push_str("Failed cells:\n\n");
                for (n, line, cell, err, path) in &g.failed {
                    let _ = writeln!(
                        md,
                        "- cell {n} (line {line}) `{cell}`: {err} (`{}`)",
                        path.display()
                    );
                }
                md.push('\n');
            }
            if !g.missing.is_empty() {
                md.push_str("Missing cells:\n\n");
                for (n, line, cell) in &g.missing {
                    let _ = writeln!(md, "- cell {n} (line {line}) `{cell}`");
                }
                md.push('\n');
            }
            if !g.outside.is_empty() {
                md.push_str("Runs the grid does not list (included in the tables):\n\n");
                for (p, cell) in &g.outside {
                    let _ = writeln!(md, "- `{cell}` (`{}`)", p.display());
                }
                md.push('\n');
            }
        } else if !self.found.failed.is_empty() {
            md.push_str("## Failed cells\n\n");
            for (p, cell, err) in &self.found.failed {
                let first = err.lines().next().unwrap_or("(no message)");
                let _ = writeln!(md, "- `{cell}`: {first} (`{}`)", p.display());
            }
            md.push('\n');
        }
        if !self.found.stale_failed.is_empty() {
            md.push_str("Ignored `failed.txt` next to a `metrics.json` (the cell was rerun):\n\n");
            for p in &self.found.stale_failed {
                let _ = writeln!(md, "- `{}`", p.display());
            }
            md.push('\n');
        }
        md
    }

    /// An SVG plot of `task`'s main metric against label fraction, one line per
    /// initialisation, points at the mean with ±1 sd bars. None when the task has no values.
    pub fn svg(&self, task: Task) -> Option<String> {
        let metric = task.main_metric();
        // init -> [(fraction, mean, sd)]
        let mut series: BTreeMap<Init, Vec<(f64, f64, f64)>> = BTreeMap::new();
        for ((t, f, init), metrics) in &self.groups {
            if *t != task {
                continue;
            }
            if let Some(Summary {
                mean: Some(m), sd, ..
            }) = metrics.get(metric)
            {
                series
                    .entry(*init)
                    .or_default()
                    .push((*f as f64 / 1e6, *m, sd.unwrap_or(0.0)));
            }
        }
        if series.is_empty() {
            return None;
        }
        let (w, h) = (560.0, 360.0);
        let (left, right, top, bottom) = (70.0, 150.0, 40.0, 50.0);
        let lo = series
            .values()
            .flatten()
            .map(|p| p.1 - p.2)
            .fold(f64::INFINITY, f64::min);
        let hi = series
            .values()
            .flatten()
            .map(|p| p.1 + p.2)
            .fold(f64::NEG_INFINITY, f64::max);
        let (y0, y1, step) = nice_range(lo, hi);
        let px = |f: f64| left + f * (w - left - right);
        let py = |v: f64| top + (y1 - v) / (y1 - y0) * (h - top - bottom);
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
            (left + w - right) / 2.0,
            xml_escape(&format!("{task}: {metric} against label fraction"))
        );
        // Axes and ticks.
        let (xa, ya) = (px(0.0), py(y0));
        let _ = writeln!(
            s,
            r#"<path d="M{xa:.1} {:.1} V{ya:.1} H{:.1}" stroke="black" fill="none"/>"#,
            py(y1),
            px(1.0)
        );
        let mut fractions: Vec<f64> = series.values().flatten().map(|p| p.0).collect();
        fractions.push(0.0);
        fractions.sort_by(f64::total_cmp);
        fractions.dedup();
        for f in fractions {
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" y1="{ya:.1}" x2="{x:.1}" y2="{:.1}" stroke="black"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{f}</text>"#,
                ya + 5.0,
                ya + 18.0,
                x = px(f)
            );
        }
        let ticks = ((y1 - y0) / step).round() as usize;
        for i in 0..=ticks {
            let v = y0 + i as f64 * step;
            let y = py(v);
            let _ = writeln!(
                s,
                r##"<line x1="{:.1}" y1="{y:.1}" x2="{xa:.1}" y2="{y:.1}" stroke="black"/><line x1="{xa:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#dddddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
                xa - 5.0,
                px(1.0),
                xa - 8.0,
                y + 4.0,
                tick_text(v, step)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">label fraction</text>"#,
            (left + w - right) / 2.0,
            h - 12.0
        );
        let _ = writeln!(
            s,
            r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
            (top + h - bottom) / 2.0,
            (top + h - bottom) / 2.0,
            xml_escape(metric)
        );
        for (k, (init, points)) in series.iter().enumerate() {
            let (colour, dash) = match init {
                Init::Pretrained => ("#1f77b4", ""),
                Init::Scratch => ("#d95f02", r#" stroke-dasharray="6 4""#),
            };
            let path: Vec<String> = points
                .iter()
                .map(|(f, m, _)| format!("{:.1},{:.1}", px(*f), py(*m)))
                .collect();
            let _ = writeln!(
                s,
                r#"<polyline class="{init}" points="{}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>"#,
                path.join(" ")
            );
            for (f, m, sd) in points {
                let x = px(*f);
                if *sd > 0.0 {
                    let _ = writeln!(
                        s,
                        r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{colour}"/>"#,
                        py(m - sd),
                        py(m + sd)
                    );
                }
                let _ = writeln!(
                    s,
                    r#"<circle class="{init}" cx="{x:.1}" cy="{:.1}" r="4" fill="{colour}"><title>{init} {f}: {} ± {}</title></circle>"#,
                    py(*m),
                    short(*m),
                    short(*sd)
                );
            }
            let ly = top + 10.0 + 20.0 * k as f64;
            let lx = w - right + 15.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{colour}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{init}</text>"#,
                lx + 30.0,
                lx + 36.0,
                ly + 4.0
            );
        }
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" font-size="10" fill="#555555">mean, bars ±1 sd</text><text x="{:.1}" y="{:.1}" font-size="10" fill="#555555">over folds and seeds</text>"##,
            w - right + 15.0,
            top + 58.0,
            w - right + 15.0,
            top + 71.0
        );
        s.push_str("</svg>\n");
        Some(s)
    }
}

/// A y range covering [lo, hi] with round ends and a 1-2-5 step (about 5 ticks).
fn nice_range(lo: f64, hi: f64) -> (f64, f64, f64) {
    let (lo, hi) = if hi - lo < 1e-9 {
        let pad = if lo.abs() > 1e-9 {
            lo.abs() * 0.05
        } else {
            0.05
        };
        (lo - pad, hi + pad)
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((lo / step).floor() * step, (hi / step).ceil() * step, step)
}

fn tick_text(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

// ---------------------------------------------------------------- command

/// Gather fine-tuning results into tables and plots; name missing and failed grid cells.
#[derive(Args, Debug, Clone)]
#[command(
    long_about = "Gather every metrics.json below the folders (docs/DOWNSTREAM.md defines it) \
into OUT/report.md and OUT/report.csv: mean and sample standard deviation over folds and seeds \
per task, label fraction and initialisation, and the pretrained-minus-scratch difference of each \
task's main metric (diagnosis auc, age mae, segmentation dice_wt) paired by (fold, seed), with a \
percentile bootstrap 95% interval. OUT/TASK.svg plots the main metric against label fraction, \
pretrained vs scratch. With --grid-file, the report lists the grid's missing cells and failed \
ones (a failed.txt where metrics.json would be). The same inputs give byte-identical outputs.",
    after_help = "Examples:\n  mtx-hpc report runs/eval\n  \
mtx-hpc report runs/eval-a runs/eval-b --grid-file jobs/eval_grid.txt --out runs/report\n\n\
Exit status 1 for an unreadable or invalid metrics.json, failed.txt or grid file (the message \
names the file and line); missing and failed cells are listed, not errors."
)]
pub struct ReportArgs {
    /// Folders searched recursively for metrics.json and failed.txt.
    #[arg(required = true, value_name = "DIR")]
    pub dirs: Vec<PathBuf>,
    /// The grid file the runs came from: list its missing and failed cells.
    #[arg(long, value_name = "FILE")]
    pub grid_file: Option<PathBuf>,
    /// Output folder (created if missing) [default: the first DIR/report].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Bootstrap resamples for the confidence intervals.
    #[arg(long, default_value_t = 10_000)]
    pub bootstrap: usize,
    /// Seed of the bootstrap resampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `mtx-hpc report`.
pub fn run(args: &ReportArgs) -> Result<()> {
    let grid = args.grid_file.as_deref().map(Grid::read).transpose()?;
    if args.bootstrap == 0 {
        bail!("--bootstrap must be at least 1");
    }
    let found = gather(&args.dirs)?;
    let report = build(found, grid.as_ref(), args.bootstrap, args.seed)?;
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.dirs[0].join("report"));
    std::fs::create_dir_all(&out)
        .with_context(|| format!("{}: cannot create the output folder", out.display()))?;
    let md = out.join("report.md");
    crate::io::write_atomic(&md, report.markdown(&args.dirs).as_bytes(), true)?;
    crate::io::write_atomic(&out.join("report.csv"), report.csv().as_bytes(), true)?;
    for task in report.tasks() {
        if let Some(svg) = report.svg(task) {
            crate::io::write_atomic(&out.join(format!("{task}.svg")), svg.as_bytes(), true)?;
        }
    }
    println!(
        "{} runs, {} failed cells{}; wrote {}",
        report.found.runs.len(),
        report.found.failed.len(),
        report
            .grid
            .as_ref()
            .map(|g| format!(
                "; grid: {} of {} done, {} failed, {} missing",
                g.done,
                g.total,
                g.failed.len(),
                g.missing.len()
            ))
            .unwrap_or_default(),
        md.display()
    );
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::downstream::metrics::Metric;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    /// A metrics.json for `cell` with the given metrics, in its canonical folder below `root`.
    pub(crate) fn write_run(root: &Path, cell: &str, folds: usize, metrics: &[(&str, Metric)]) {
        let c = Cell::parse(cell).unwrap();
        let mut results = MetricSet::default();
        for (name, v) in metrics {
            results.insert(name, v.clone());
        }
        let m = MetricsFile {
            format: METRICS_FORMAT.into(),
            task: c.task,
            fold: c.fold,
            folds,
            fraction: c.fraction,
            seed: c.seed,
            init: c.init,
            checkpoint_checksum: (c.init == Init::Pretrained).then(|| "ab12".into()),
            corpus_checksum: "cd34".into(),
            tool_version: crate::TOOL_VERSION.into(),
            params_trained: 1000,
            params_total: 1200,
            results,
        };
        let dir = root.join(c.relative_dir());
        std::fs::create_dir_all(&dir).unwrap();
        m.write(&dir.join(METRICS_FILE), false).unwrap();
    }

    const GRID: &str = "# task fold fraction init seed\n\
        diagnosis 0 1 pretrained 0\n\
        diagnosis 1 1 pretrained 0   # trailing comment\n\
        diagnosis 0 1 scratch 0\n\
        diagnosis 1 1 scratch 0\n\
        \n\
        diagnosis 0 0.5 pretrained 0\n\
        diagnosis 1 0.5 pretrained 0\n\
        diagnosis 0 0.5 scratch 0\n\
        diagnosis 1 0.5 scratch 0\n\
        diagnosis 0 0.25 scratch 0\n\
        segmentation 0 1 pretrained 0\n";

    /// The tree of `report_aggregates_pairs_and_names_missing_and_failed_cells`.
    pub(crate) fn example_tree(root: &Path) {
        write_run(
            root,
            "diagnosis 0 1 pretrained 0",
            2,
            &[("auc", Ok(0.8)), ("accuracy", Ok(0.7))],
        );
        write_run(
            root,
            "diagnosis 1 1 pretrained 0",
            2,
            &[("auc", Ok(0.9)), ("accuracy", Ok(0.8))],
        );
        write_run(
            root,
            "diagnosis 0 1 scratch 0",
            2,
            &[("auc", Ok(0.7)), ("accuracy", Ok(0.6))],
        );
        write_run(
            root,
            "diagnosis 1 1 scratch 0",
            2,
            &[("auc", Ok(0.6)), ("accuracy", Ok(0.6))],
        );
        write_run(
            root,
            "diagnosis 0 0.5 pretrained 0",
            2,
            &[("auc", Err("one class".into()))],
        );
        write_run(
            root,
            "diagnosis 1 0.5 pretrained 0",
            2,
            &[("auc", Ok(0.75))],
        );
        write_run(root, "diagnosis 0 0.5 scratch 0", 2, &[("auc", Ok(0.5))]);
        write_run(root, "diagnosis 1 0.5 scratch 0", 2, &[("auc", Ok(0.55))]);
        write_run(root, "age 0 1 pretrained 0", 5, &[("mae", Ok(5.0))]);
        let failed = Cell::parse("diagnosis 0 0.25 scratch 0").unwrap();
        let dir = root.join(failed.relative_dir());
        std::fs::create_dir_all(&dir).unwrap();
        write_failed(
            &dir,
            &failed,
            "corpus.h5: no subject has a diagnosis\nmore detail",
        )
        .unwrap();
    }

    #[test]
    fn grid_file_parses_cells_and_names_bad_lines() {
        let p = Path::new("grid.txt");
        let g = Grid::parse(GRID, p).unwrap();
        assert_eq!(g.cells.len(), 10);
        assert_eq!(g.cells[0].0, 2);
        assert_eq!(g.cells[4].0, 7); // the blank line is skipped, numbering is by file line
        assert_eq!(g.cell(1).unwrap().to_string(), "diagnosis 1 1 pretrained 0");
        assert_eq!(
            g.cell(9).unwrap(),
            Cell {
                task: Task::Segmentation,
                fold: 0,
                fraction: 1.0,
                init: Init::Pretrained,
                seed: 0
            }
        );
        let e = g.cell(10).unwrap_err().to_string();
        assert!(
            e.contains("grid.txt: cell 10 is out of range") && e.contains("0 to 9"),
            "{e}"
        );
        for (text, want) in [
            ("age 0 1 scratch\n", "line 1: expected 5 fields"),
            ("# c\nbrain 0 1 scratch 0\n", "line 2: unknown task 'brain'"),
            (
                "age -1 1 scratch 0\n",
                "line 1: fold '-1' is not a non-negative integer",
            ),
            (
                "age 0 1.5 scratch 0\n",
                "line 1: label fraction 1.5 is outside (0, 1]",
            ),
            ("age 0 0 scratch 0\n", "outside (0, 1]"),
            ("age 0 half scratch 0\n", "fraction 'half' is not a number"),
            ("age 0 1 random 0\n", "unknown initialisation 'random'"),
            ("age 0 1 scratch x\n", "seed 'x' is not"),
            (
                "age 0 1 scratch 0\n\nage 0 1.0 scratch 0\n",
                "line 3: cell 'age 0 1 scratch 0' repeats line 1",
            ),
            ("# nothing\n\n", "lists no cells"),
        ] {
            let e = Grid::parse(text, p).unwrap_err().to_string();
            assert!(
                e.starts_with("grid.txt") && e.contains(want),
                "{text:?}: {e}"
            );
        }
    }

    #[test]
    fn metrics_file_round_trips_and_rejects_inconsistent_content() {
        let dir = tempfile::tempdir().unwrap();
        write_run(
            dir.path(),
            "age 2 0.5 scratch 7",
            3,
            &[("mae", Ok(4.0)), ("pearson_r", Err("constant".into()))],
        );
        let path = dir
            .path()
            .join("age/fraction-0.5/scratch/fold-2-seed-7")
            .join(METRICS_FILE);
        let m = MetricsFile::read(&path).unwrap();
        assert_eq!(m.cell().to_string(), "age 2 0.5 scratch 7");
        assert_eq!(m.checkpoint_checksum, None);
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(json["task"], "age");
        assert_eq!(json["init"], "scratch");
        assert_eq!(json["metrics"]["pearson_r"], serde_json::Value::Null);
        assert_eq!(json["reasons"]["pearson_r"], "constant");
        let bad = |edit: &dyn Fn(&mut serde_json::Value), want: &str| {
            let mut j = json.clone();
            edit(&mut j);
            std::fs::write(&path, j.to_string()).unwrap();
            let e = format!("{:#}", MetricsFile::read(&path).unwrap_err());
            assert!(
                e.contains(&path.display().to_string()) && e.contains(want),
                "{e}"
            );
        };
        bad(&|j| j["format"] = "other 2".into(), "format is 'other 2'");
        bad(
            &|j| j["fold"] = 3.into(),
            "fold 3 is out of range for 3 folds",
        );
        bad(&|j| j["fraction"] = 0.0.into(), "outside (0, 1]");
        bad(
            &|j| j["init"] = "pretrained".into(),
            "without checkpoint_checksum",
        );
        bad(
            &|j| j["task"] = "brainage".into(),
            "unknown task 'brainage'",
        );
        bad(
            &|j| j["params_trained"] = 5000.into(),
            "exceeds params_total",
        );
        bad(
            &|j| j["reasons"] = serde_json::json!({}),
            "'pearson_r' is null without a reason",
        );
        bad(
            &|j| {
                j.as_object_mut()
                    .unwrap()
                    .remove("corpus_checksum")
                    .map(|_| ())
                    .unwrap()
            },
            "corpus_checksum",
        );
        std::fs::write(&path, "{not json").unwrap();
        assert!(
            format!("{:#}", MetricsFile::read(&path).unwrap_err())
                .contains("not a valid metrics.json")
        );
    }

    #[test]
    fn report_aggregates_pairs_and_names_missing_and_failed_cells() {
        let dir = tempfile::tempdir().unwrap();
        example_tree(dir.path());
        let grid = Grid::parse(GRID, Path::new("grid.txt")).unwrap();
        let found = gather(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!((found.runs.len(), found.failed.len()), (9, 1));
        let r = build(found, Some(&grid), 2000, 0).unwrap();

        let full = &r.groups[&(Task::Diagnosis, 1_000_000, Init::Pretrained)]["auc"];
        assert_eq!((full.n, full.n_null), (2, 0));
        assert!(close(full.mean.unwrap(), 0.85) && close(full.sd.unwrap(), 0.005f64.sqrt()));
        let half = &r.groups[&(Task::Diagnosis, 500_000, Init::Pretrained)]["auc"];
        assert_eq!((half.n, half.n_null, half.sd), (1, 1, None));
        assert!(close(half.mean.unwrap(), 0.75));

        // Pairs at fraction 1: differences 0.1 and 0.3; a 2-pair bootstrap mean is 0.1,
        // 0.2 or 0.3 with probability 1/4, 1/2, 1/4, so the interval is [0.1, 0.3].
        let d1 = r
            .differences
            .iter()
            .find(|d| d.fraction == 1_000_000)
            .unwrap();
        assert_eq!((d1.task, d1.pairs, d1.unpaired), (Task::Diagnosis, 2, 0));
        assert!(close(d1.summary.mean.unwrap(), 0.2));
        let (lo, hi) = d1.ci.clone().unwrap();
        assert!(close(lo, 0.1) && close(hi, 0.3), "{lo} {hi}");
        // At 0.5 the pretrained fold 0 is null: one pair (0.75 - 0.55), scratch fold 0 unpaired.
        let d5 = r
            .differences
            .iter()
            .find(|d| d.task == Task::Diagnosis && d.fraction == 500_000)
            .unwrap();
        assert_eq!((d5.pairs, d5.unpaired), (1, 1));
        assert!(close(d5.summary.mean.unwrap(), 0.2));
        assert!(d5.ci.clone().unwrap_err().contains("at least 2"));
        // Age has a pretrained run only: unpaired, no pairs.
        let da = r.differences.iter().find(|d| d.task == Task::Age).unwrap();
        assert_eq!((da.pairs, da.unpaired, da.summary.mean), (0, 1, None));

        let g = r.grid.as_ref().unwrap();
        assert_eq!((g.total, g.done), (10, 8));
        assert_eq!(g.missing.len(), 1);
        assert_eq!((g.missing[0].0, g.missing[0].1), (9, 12));
        assert_eq!(g.failed.len(), 1);
        assert_eq!((g.failed[0].0, g.failed[0].1), (8, 11));
        assert_eq!(g.failed[0].3, "corpus.h5: no subject has a diagnosis");
        assert_eq!(g.outside.len(), 1);
        assert_eq!(g.outside[0].1.to_string(), "age 0 1 pretrained 0");

        let csv = r.csv();
        assert!(csv.starts_with(
            "task,fraction,init,metric,n,n_null,mean,sd,min,max,ci95_low,ci95_high\n"
        ));
        // Main metric first within each group; the difference rows carry the interval.
        assert!(
            csv.contains("\ndiagnosis,1,pretrained,auc,2,0,0.85,"),
            "{csv}"
        );
        assert!(
            csv.contains("\ndiagnosis,0.5,pretrained,auc,1,1,0.75,,0.75,0.75,,\n"),
            "{csv}"
        );
        assert!(
            csv.contains("\ndiagnosis,0.5,pretrained-minus-scratch,auc,1,0,"),
            "{csv}"
        );
        assert!(
            csv.contains("\nage,1,pretrained,mae,1,0,5,,5,5,,\n"),
            "{csv}"
        );
        let auc_row = csv
            .lines()
            .position(|l| l.starts_with("diagnosis,1,pretrained,auc"))
            .unwrap();
        let acc_row = csv
            .lines()
            .position(|l| l.starts_with("diagnosis,1,pretrained,accuracy"))
            .unwrap();
        assert_eq!(acc_row, auc_row + 1);
        let diff_row = csv
            .lines()
            .find(|l| l.starts_with("diagnosis,1,pretrained-minus-scratch"))
            .unwrap();
        let f: Vec<&str> = diff_row.split(',').collect();
        assert!(
            close(f[10].parse().unwrap(), 0.1) && close(f[11].parse().unwrap(), 0.3),
            "{diff_row}"
        );

        let md = r.markdown(&[dir.path().to_path_buf()]);
        assert!(
            md.contains("| 1 | pretrained | 0.8500 ± 0.0707 (n=2) | 0.7500 ± 0.0707 (n=2) |"),
            "{md}"
        );
        assert!(
            md.contains("| 0.5 | pretrained | 0.7500 (n=1, 1 null) |"),
            "{md}"
        );
        assert!(
            md.contains("| 1 | 2 | 0 | 0.2000 | [0.1000, 0.3000] |"),
            "{md}"
        );
        assert!(
            md.contains("null (a bootstrap interval needs at least 2 items, got 1)"),
            "{md}"
        );
        assert!(
            md.contains("10 cells: 8 done, 1 failed, 1 missing."),
            "{md}"
        );
        assert!(
            md.contains("- cell 9 (line 12) `segmentation 0 1 pretrained 0`"),
            "{md}"
        );
        assert!(md.contains("- cell 8 (line 11) `diagnosis 0 0.25 scratch 0`: corpus.h5: no subject has a diagnosis"), "{md}");
        assert!(
            md.contains("Parameters (pretrained): 1000 trained of 1200."),
            "{md}"
        );
        assert!(md.contains("Main metric: `mae` (lower is better)"), "{md}");
        assert!(
            md.contains("Pretrained minus scratch, `auc` (positive favours pretraining)"),
            "{md}"
        );
        assert!(
            md.contains("Pretrained minus scratch, `mae` (negative favours pretraining)"),
            "{md}"
        );

        let svg = r.svg(Task::Diagnosis).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle class=\"pretrained\"").count(), 2);
        assert_eq!(svg.matches("<circle class=\"scratch\"").count(), 2);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("diagnosis: auc against label fraction"));
        assert!(r.svg(Task::Segmentation).is_none());
    }

    #[test]
    fn conflicting_or_empty_inputs_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let e = gather(&[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(e.contains("no metrics.json or failed.txt below"), "{e}");
        let e = gather(&[dir.path().join("nope")]).unwrap_err().to_string();
        assert!(e.contains("nope: no such folder"), "{e}");
        write_run(
            &dir.path().join("a"),
            "age 0 1 scratch 0",
            5,
            &[("mae", Ok(4.0))],
        );
        write_run(
            &dir.path().join("b"),
            "age 0 1 scratch 0",
            5,
            &[("mae", Ok(4.5))],
        );
        let e = gather(&[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(
            e.contains("is also reported by") && e.contains("age 0 1 scratch 0"),
            "{e}"
        );
        std::fs::remove_dir_all(dir.path().join("b")).unwrap();
        write_run(
            &dir.path().join("b"),
            "age 1 1 scratch 0",
            3,
            &[("mae", Ok(4.5))],
        );
        let e = gather(&[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(
            e.contains("uses 3 folds but") && e.contains("uses 5"),
            "{e}"
        );
        std::fs::remove_dir_all(dir.path().join("b")).unwrap();
        std::fs::create_dir_all(dir.path().join("c")).unwrap();
        std::fs::write(dir.path().join("c").join(FAILED_FILE), "oops\n").unwrap();
        let e = gather(&[dir.path().to_path_buf()]).unwrap_err().to_string();
        assert!(
            e.contains("failed.txt: the first line must be the failed cell"),
            "{e}"
        );
        // A failed.txt beside a metrics.json is stale: ignored and listed.
        std::fs::remove_dir_all(dir.path().join("c")).unwrap();
        let cell = Cell::parse("age 0 1 scratch 0").unwrap();
        write_failed(
            &dir.path().join("a").join(cell.relative_dir()),
            &cell,
            "old",
        )
        .unwrap();
        let found = gather(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(
            (
                found.runs.len(),
                found.failed.len(),
                found.stale_failed.len()
            ),
            (1, 0, 1)
        );
    }

    #[test]
    fn nice_ranges_cover_the_data() {
        assert_eq!(nice_range(0.52, 0.91), (0.5, 1.0, 0.1));
        let (lo, hi, step) = nice_range(3.2, 3.2);
        assert!(lo < 3.2 && hi > 3.2 && step > 0.0);
        assert_eq!(tick_text(0.5, 0.1), "0.5");
        assert_eq!(tick_text(20.0, 5.0), "20");
        assert_eq!(xml_escape("a<b&\"c\""), "a&lt;b&amp;&quot;c&quot;");
    }
}
