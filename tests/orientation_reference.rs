//! Orientation against a real reader: Colin27 (full head) and the MNI152 T1 packed by us and
//! by nibabel (canonical orientation) + scipy must agree better than any A-P or S-I flip of
//! the reference, with the foreground centred, whatever voxel order the file uses.
use mtx_hpc::data::preprocess::{Align, Normalise, PackParams, prepare_subject};
use std::path::{Path, PathBuf};
use std::process::Command;

const PYTHON: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python");
const REFERENCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/preprocess_nibabel.py");
const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/nifti_cases.py");
const COLIN: &str = "/usr/share/mricron/templates/ch2.nii.gz";
const MNI: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/.venv/lib/python3.11/site-packages/nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
);
const GRID: [usize; 3] = [96, 114, 96];

fn require(path: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: run scripts/setup.sh (it installs mricron-data, the Python venv \
         and the nilearn template)"
    );
}

fn python(args: &[&std::ffi::OsStr]) {
    require(PYTHON);
    let out = Command::new(PYTHON)
        .args(args)
        .output()
        .expect("python runs");
    assert!(
        out.status.success(),
        "python {args:?} failed (run scripts/setup.sh?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn reference(file: &Path, dir: &Path) -> Vec<f32> {
    let out = dir.join("reference.f32");
    python(&[
        REFERENCE.as_ref(),
        "reference".as_ref(),
        file.as_os_str(),
        out.as_os_str(),
    ]);
    let bytes = std::fs::read(&out).expect("reference written");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn ours(file: &Path, align: Align) -> Vec<f32> {
    let params = PackParams {
        spacing: 2.0,
        grid: GRID,
        align,
        normalise: Normalise::Minmax,
        volume: None,
    };
    let prep = prepare_subject(file, None, &params)
        .unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
    for w in &prep.warnings {
        eprintln!("warning: {w}");
    }
    prep.volume
}

fn ncc(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let ma = a.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let mb = b.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let (mut ab, mut aa, mut bb) = (0.0, 0.0, 0.0);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x) - ma, f64::from(y) - mb);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    ab / (aa * bb).sqrt()
}

/// `v` mirrored along grid axis `axis` (1 = A-P, 2 = S-I).
fn flip(v: &[f32], axis: usize) -> Vec<f32> {
    let [nx, ny, nz] = GRID;
    let mut out = vec![0.0; v.len()];
    for x in 0..nx {
        for y in 0..ny {
            for z in 0..nz {
                let (fy, fz) = match axis {
                    1 => (ny - 1 - y, z),
                    _ => (y, nz - 1 - z),
                };
                out[(x * ny + y) * nz + z] = v[(x * ny + fy) * nz + fz];
            }
        }
    }
    out
}

/// Checks `file` packed by us against `reference`; returns the correlation.
fn check(label: &str, file: &Path, align: Align, reference: &[f32]) -> (f64, Vec<f32>) {
    let vol = ours(file, align);
    let r = ncc(&vol, reference);
    let flips = [
        ("A-P flip", flip(reference, 1)),
        ("S-I flip", flip(reference, 2)),
        ("A-P + S-I flip", flip(&flip(reference, 1), 2)),
    ];
    for (name, f) in &flips {
        let rf = ncc(&vol, f);
        assert!(
            r > rf,
            "{label}: correlation with the reference {r:.3} does not beat its {name} {rf:.3}"
        );
    }
    assert!(
        r > 0.8,
        "{label}: correlation with the reference only {r:.3}"
    );
    // Centre of mass of our foreground within 15% of the grid centre on every axis.
    let (mut sum, mut n) = ([0.0f64; 3], 0.0);
    for x in 0..GRID[0] {
        for y in 0..GRID[1] {
            for z in 0..GRID[2] {
                if vol[(x * GRID[1] + y) * GRID[2] + z] > 0.1 {
                    sum[0] += x as f64;
                    sum[1] += y as f64;
                    sum[2] += z as f64;
                    n += 1.0;
                }
            }
        }
    }
    for a in 0..3 {
        let com = sum[a] / n;
        let centre = (GRID[a] as f64 - 1.0) / 2.0;
        assert!(
            (com - centre).abs() <= 0.15 * GRID[a] as f64,
            "{label}: foreground centre of mass {com:.1} on axis {a}, grid centre {centre:.1}"
        );
    }
    eprintln!("{label}: correlation with nibabel+scipy {r:.4}");
    (r, vol)
}

#[test]
fn colin27_and_mni152_match_nibabel_in_any_voxel_order() {
    require(COLIN);
    require(MNI);
    let dir = tempfile::tempdir().expect("temporary folder");
    let colin_ref = reference(Path::new(COLIN), dir.path());
    let (_, colin_ours) = check(
        "Colin27 ch2 (RAS)",
        Path::new(COLIN),
        Align::Centre,
        &colin_ref,
    );
    for codes in ["LPS", "PIR"] {
        let file: PathBuf = dir.path().join(format!("ch2_{codes}.nii.gz"));
        python(&[
            CASES.as_ref(),
            "reorient".as_ref(),
            COLIN.as_ref(),
            codes.as_ref(),
            file.as_os_str(),
        ]);
        let (_, vol) = check(
            &format!("Colin27 rewritten {codes}"),
            &file,
            Align::Centre,
            &colin_ref,
        );
        let same = ncc(&vol, &colin_ours);
        assert!(
            same > 0.99,
            "Colin27 {codes} vs RAS packed by us: correlation {same:.4}"
        );
    }
    let mni_ref = reference(Path::new(MNI), dir.path());
    check("MNI152 2009a", Path::new(MNI), Align::Centre, &mni_ref);
    // The template is in MNI space: the fixed MNI box must hold it centred as well.
    check(
        "MNI152 2009a, --align world",
        Path::new(MNI),
        Align::World,
        &mni_ref,
    );
}
