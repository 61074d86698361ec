//! `inspect`: corpus summary, subject metadata, mid-plane PNG (size, orientation, overlay),
//! and clear errors for unknown subjects, other format versions and files that are not ours.
mod common;

use common::*;
use mtx_hpc::data::corpus::Corpus;
use mtx_hpc::data::inspect::{FileKind, describe_corpus, detect};
use mtx_hpc::data::montage::{SCALE, label_colour, mid_planes, montage_size};
use std::path::Path;
use std::process::{Command, Output};

const GRID: [usize; 3] = [6, 7, 8];

fn inspect(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mtx-hpc"))
        .arg("inspect")
        .args(args)
        .output()
        .expect("run mtx-hpc")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn corpus_summary_has_format_split_and_label_statistics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_corpus(&dir.path().join("c.h5"), GRID, 5, true);
    let c = Corpus::open(&path).expect("open");
    let t = describe_corpus(&c).expect("describe");
    for want in [
        "mtx-hpc-corpus version 1",
        "6 x 7 x 8 voxels (RAS), spacing 2 mm",
        "volumes:       5 (5 subjects)",
        "train 4, val 1",
        "diagnosis:     AD 1, CN 2, MCI 1, unknown 1",
        "sex:           F 2, M 2, unknown 1",
        "site:          site0 3, site1 2",
        "age:           min 20.5, mean 22.5, max 24.5 (4 known, 1 unknown)",
        // 2 segmented subjects x a 2x2 column of 8 voxels: labels 1,2,4 along z (3,3,2 each).
        "segmentation:  2 volume(s); voxels label 1: 24, label 2: 24, label 4: 16",
        "affine source: qform 2, sform 3",
        "grid 6,7,8, align centre, normalise minmax",
        "mtx-hpc pack --manifest m.csv",
    ] {
        assert!(t.contains(want), "missing '{want}' in:\n{t}");
    }
    assert!(
        t.contains(&format!("tool version:  {}", mtx_hpc::TOOL_VERSION)),
        "{t}"
    );
    let out = inspect(&[path.as_os_str()]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("train 4, val 1"), "{stdout}");
}

#[test]
fn subject_metadata_png_and_unknown_subject() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_corpus(&dir.path().join("c.h5"), GRID, 4, true);
    let png_path = dir.path().join("s1.png");
    let out = inspect(&[
        path.as_os_str(),
        "--subject".as_ref(),
        "S001".as_ref(),
        "--png".as_ref(),
        png_path.as_os_str(),
    ]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    for want in [
        "subject:        S001",
        "session:        ses-02",
        "age:            21.5",
        "segmentation:   yes",
        "source shape:   [13, 14, 16]",
        "(qform)",
        "neurological",
    ] {
        assert!(stdout.contains(want), "missing '{want}' in:\n{stdout}");
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).expect("png"),
    ));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let (w, h) = montage_size(GRID);
    assert_eq!((info.width as usize, info.height as usize), (w, h));
    assert_eq!(info.color_type, png::ColorType::Rgb);
    // Axial mid-plane z = 4 carries label [1, 2, 4][4 % 3] = 2 (green) at x 2..4, y 2..4:
    // column x, row Y-1-y, panel centred vertically.
    let y0 = (h - GRID[1] * SCALE) / 2;
    let at = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        [buf[i], buf[i + 1], buf[i + 2]]
    };
    let p = at(2 * SCALE, y0 + (GRID[1] - 1 - 2) * SCALE);
    assert!(
        p[1] > p[0] + 60 && p[1] > p[2] + 60,
        "expected green overlay, got {p:?}"
    );
    let q = at(0, y0);
    assert_eq!(q[0], q[1], "no overlay outside labels: {q:?}");

    let out = inspect(&[path.as_os_str(), "--subject".as_ref(), "NOPE".as_ref()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no subject 'NOPE'") && stderr.contains("S000, S001, S002, S003"),
        "{stderr}"
    );
}

#[test]
fn montage_puts_left_anterior_and_superior_where_documented() {
    let grid = [10, 12, 14];
    let [nx, ny, nz] = grid;
    let n = nx * ny * nz;
    // A black volume: an overlay pixel is then exactly half its label colour.
    let volume = vec![0.0f32; n];
    let mut labels = vec![0u8; n];
    let idx = |x: usize, y: usize, z: usize| (x * ny + y) * nz + z;
    labels[idx(1, 10, nz / 2)] = 1; // left, anterior: axial top-left
    labels[idx(nx / 2, 11, 3)] = 2; // anterior, inferior: sagittal bottom-right
    labels[idx(8, ny / 2, 12)] = 4; // right, superior: coronal top-right
    let img = mid_planes(&volume, Some(&labels), grid).expect("render");
    assert_eq!((img.width, img.height), montage_size(grid));
    let find = |colour: [u8; 3]| -> Vec<(usize, usize)> {
        let mut hits = Vec::new();
        for y in 0..img.height {
            for x in 0..img.width {
                if img.pixel(x, y) == colour.map(|c| (f32::from(c) * 0.5).round() as u8) {
                    hits.push((x, y));
                }
            }
        }
        hits
    };
    let s = SCALE;
    let height = img.height;
    let red = find(label_colour(1).expect("red"));
    let y0 = (height - ny * s) / 2;
    assert!(
        red.contains(&(s, y0 + (ny - 1 - 10) * s)),
        "axial marker: {red:?}"
    );
    let green = find(label_colour(2).expect("green"));
    let sag_x0 = nx * s + 4;
    let sag_y0 = (height - nz * s) / 2;
    assert!(
        green.contains(&(sag_x0 + 11 * s, sag_y0 + (nz - 1 - 3) * s)),
        "sagittal marker: {green:?}"
    );
    let yellow = find(label_colour(4).expect("yellow"));
    let cor_x0 = sag_x0 + ny * s + 4;
    assert!(
        yellow.contains(&(cor_x0 + 8 * s, sag_y0 + (nz - 1 - 12) * s)),
        "coronal marker: {yellow:?}"
    );
}

#[test]
fn inspect_refuses_other_versions_and_foreign_files_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_corpus(&dir.path().join("v3.h5"), GRID, 2, false);
    {
        let f = common::h5_open(&path, true);
        f.delete_attr("format_version").expect("delete");
        f.new_attr::<u32>()
            .create("format_version")
            .expect("attr")
            .write_scalar(&3u32)
            .expect("write");
    }
    let out = inspect(&[path.as_os_str()]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(
        stderr.contains("v3.h5")
            && stderr.contains("version 3")
            && stderr.contains("reads version 1"),
        "{stderr}"
    );

    let fake = dir.path().join("fake.h5");
    std::fs::write(&fake, "not hdf5").expect("write");
    let (_, stderr) = text(&inspect(&[fake.as_os_str()]));
    assert!(
        stderr.contains("fake.h5") && stderr.contains("not an HDF5 file"),
        "{stderr}"
    );

    let other = dir.path().join("notes.txt");
    std::fs::write(&other, "hello").expect("write");
    let (_, stderr) = text(&inspect(&[other.as_os_str()]));
    assert!(
        stderr.contains("notes.txt") && stderr.contains("neither a corpus"),
        "{stderr}"
    );

    let (_, stderr) = text(&inspect(&[dir.path().join("gone.h5").as_os_str()]));
    assert!(
        stderr.contains("gone.h5") && stderr.contains("no such file"),
        "{stderr}"
    );

    assert_eq!(detect(Path::new(&path)).expect("detect"), FileKind::Corpus);
    let nii = dir.path().join("t1.nii.gz");
    std::fs::write(&nii, [0x1f, 0x8b]).expect("write");
    assert_eq!(detect(&nii).expect("detect"), FileKind::Nifti);
}

#[test]
fn subjects_with_several_sessions_are_picked_as_id_colon_session() {
    use mtx_hpc::data::corpus::CorpusWriter;
    use mtx_hpc::data::inspect::find_subject;
    use mtx_hpc::io::AtomicFile;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.h5");
    let mut w = CorpusWriter::create(
        AtomicFile::new(&path, false).expect("af"),
        &path,
        header(GRID),
        3,
    )
    .expect("create");
    for (k, ses) in ["a", "b"].iter().enumerate() {
        let mut m = meta(1);
        m.session = ses.to_string();
        w.push(m, &prepared(k, GRID, false)).expect("push");
    }
    w.push(meta(2), &prepared(2, GRID, false)).expect("push");
    w.finish().expect("finish");
    let c = Corpus::open(&path).expect("open");
    assert_eq!(find_subject(&c, "S002").expect("unique"), 2);
    assert_eq!(find_subject(&c, "S001:b").expect("session"), 1);
    let err = format!("{:#}", find_subject(&c, "S001").expect_err("ambiguous"));
    assert!(
        err.contains("2 sessions") && err.contains("S001:a, S001:b"),
        "{err}"
    );
    assert_eq!(
        c.subjects()[0].split,
        c.subjects()[1].split,
        "sessions split apart"
    );
}
