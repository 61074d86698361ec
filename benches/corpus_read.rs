//! Benchmark (not a test): reading one packed subject at the paper grid (96x114x96) from a
//! corpus into reused buffers, float16 from HDF5 then converted to f32, and writing one.
//! Run: `cargo bench --bench corpus_read`. Results go to docs/PERFORMANCE.md.
use mtx_hpc::data::corpus::{Corpus, CorpusHeader, CorpusWriter, SubjectMeta};
use mtx_hpc::data::geometry::IDENTITY;
use mtx_hpc::data::preprocess::{
    AffineSource, Align, IntensityStats, Normalise, PackGeometry, PackParams, Prepared,
};
use mtx_hpc::io::AtomicFile;
use std::time::Instant;

const GRID: [usize; 3] = [96, 114, 96];
const SUBJECTS: usize = 32;

fn subject(k: usize) -> Prepared {
    let n = GRID.iter().product::<usize>();
    let volume = (0..n)
        .map(|i| ((i * 7 + k) % 1000) as f32 / 1000.0)
        .collect();
    Prepared {
        volume,
        labels: None,
        geometry: PackGeometry {
            source_shape: [181, 217, 181],
            source_affine: IDENTITY,
            affine_source: AffineSource::Sform,
            grid_affine: IDENTITY,
            grid_to_source: IDENTITY,
        },
        intensity: IntensityStats {
            threshold: 0.0,
            foreground_voxels: n,
            clip_low: 0.0,
            clip_high: 1.0,
            mean: 0.5,
            std: 0.3,
        },
        warnings: vec![],
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.h5");
    let header = CorpusHeader {
        params: PackParams {
            spacing: 2.0,
            grid: GRID,
            align: Align::Centre,
            normalise: Normalise::Minmax,
            volume: None,
        },
        creation_command: "bench".into(),
        val_fraction: 0.1,
        split_seed: 0,
    };
    let mut w = CorpusWriter::create(AtomicFile::new(&path, false)?, &path, header, SUBJECTS)?;
    let mut write_ms = Vec::new();
    for k in 0..SUBJECTS {
        let p = subject(k);
        let meta = SubjectMeta {
            id: format!("S{k:03}"),
            session: String::new(),
            source_file: String::new(),
            source_checksum: String::new(),
            age: None,
            sex: String::new(),
            diagnosis: String::new(),
            site: String::new(),
        };
        let t = Instant::now();
        w.push(meta, &p)?;
        write_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    w.finish()?;
    let c = Corpus::open(&path)?;
    let (mut raw, mut vol) = (Vec::new(), Vec::new());
    let mut read_ms = Vec::new();
    for r in 0..4 * SUBJECTS {
        let t = Instant::now();
        c.read_volume((r * 13) % SUBJECTS, &mut raw, &mut vol)?;
        read_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "corpus at {GRID:?}: write one subject median {:.2} ms; read one subject (f16 + f32 \
         conversion, page cache warm) median {:.2} ms over {} reads",
        median(write_ms),
        median(read_ms),
        4 * SUBJECTS
    );
    Ok(())
}
