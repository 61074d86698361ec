//! `mtx-hpc synth`: a synthetic cohort of T1-weighted brain MRI whose labels (age, diagnosis,
//! tumours, sex, site) are really in the images, each subject on its own random source grid.
//! Deterministic per (seed, cohort, subject), generated in parallel, written atomically.
pub mod anatomy;
pub mod atrophy;
pub mod cohort;
pub mod fields;
pub mod phantom;
pub mod random;
pub mod render;
pub mod scanner;
pub mod template;
pub mod tumour;

#[cfg(test)]
mod tests;

use crate::cli::{Cohort, SynthArgs};
use crate::data::geometry::{Mat4, apply, inverse};
use crate::data::manifest::ManifestRow;
use crate::data::nifti::write::{Encoding, HeaderInfo, write_nifti_with};
use anyhow::{Context, Result, bail, ensure};
use atrophy::Atrophy;
use cohort::{SubjectPlan, cohort_key, plan_subject};
use rand::RngExt;
use random::{subject_rng, uniform};
use rayon::prelude::*;
use render::{Rendered, Scene, SmoothFields};
use scanner::SourceGrid;
use std::path::Path;
use std::time::Instant;
use template::{Template, TemplateAnatomy};
use tumour::Tumour;

/// One generated subject, in memory.
pub struct Subject {
    pub plan: SubjectPlan,
    pub grid: SourceGrid,
    /// World -> anatomy space, to find anatomy (ventricles, hippocampi) in the image.
    pub world_to_anatomy: Mat4,
    /// Scanner units, NIfTI order (i fastest).
    pub image: Vec<f32>,
    /// BraTS labels on the same grid, for tumour subjects.
    pub labels: Option<Vec<u8>>,
    pub encoding: Encoding,
    /// sform code written (1 scanner or 2 aligned; the qform is always 1).
    pub sform_code: i16,
}

/// Where a subject's head sits and how it is scanned: drawn before any voxel is rendered, so
/// tests and tools can know a subject's grid without generating it.
pub struct SubjectGeometry {
    pub atrophy: Atrophy,
    /// World -> anatomy space (the inverse of the head's pose).
    pub world_to_anatomy: Mat4,
    pub grid: SourceGrid,
    pub fields: SmoothFields,
    /// Noise standard deviation (white-matter units) and scanner units per white matter.
    pub noise: f32,
    pub gain: f32,
    pub sform_code: i16,
}

pub fn subject_geometry(seed: u64, cohort: Cohort, plan: &SubjectPlan) -> SubjectGeometry {
    let key = cohort_key(cohort);
    let mut anatomy_rng = subject_rng(seed, key, plan.index, "anatomy");
    let atrophy = Atrophy::new(plan.age, plan.diagnosis, &mut anatomy_rng);
    let pose = scanner::random_pose(plan.male, &mut anatomy_rng);
    let world_to_anatomy = inverse(&pose).unwrap_or(crate::data::geometry::IDENTITY);
    let fields = SmoothFields::random(&mut anatomy_rng);
    let site = scanner::site(plan.site);
    let mut scanner_rng = subject_rng(seed, key, plan.index, "scanner");
    // The field of view centres a little below the brain centre, where the head's middle is.
    let grid = scanner::random_grid(
        apply(&pose, template::PHANTOM_HEAD_MIDDLE),
        &mut scanner_rng,
    );
    let noise = site.noise * uniform(&mut scanner_rng, 0.85, 1.15) as f32;
    let gain = site.gain * uniform(&mut scanner_rng, 0.9, 1.1) as f32;
    let sform_code = if scanner_rng.random_bool(0.5) { 1 } else { 2 };
    SubjectGeometry {
        atrophy,
        world_to_anatomy,
        grid,
        fields,
        noise,
        gain,
        sform_code,
    }
}

/// Generates one subject. Pure: the same arguments give the same subject on any thread.
pub fn generate(
    seed: u64,
    cohort: Cohort,
    plan: &SubjectPlan,
    template: Option<&Template>,
) -> Subject {
    let key = cohort_key(cohort);
    let stream = |purpose| subject_rng(seed, key, plan.index, purpose);
    let geometry = subject_geometry(seed, cohort, plan);
    let site = scanner::site(plan.site);
    let tumour = plan.tumour.then(|| {
        let axes = phantom::BRAIN_AXES.map(|a| a * 0.92);
        let mut rng = stream("tumour");
        match template {
            Some(t) => Tumour::random(axes, |q| t.is_deep_inside(q), &mut rng),
            None => Tumour::random(axes, |_| true, &mut rng),
        }
    });

    let phantom_anatomy;
    let template_anatomy;
    let anatomy: &dyn anatomy::Anatomy = match template {
        Some(t) => {
            template_anatomy = TemplateAnatomy::new(t, geometry.atrophy, site.contrast);
            &template_anatomy
        }
        None => {
            let mut rng = stream("phantom");
            phantom_anatomy = phantom::Phantom::new(geometry.atrophy, site.contrast, &mut rng);
            &phantom_anatomy
        }
    };
    let scene = Scene {
        grid: &geometry.grid,
        world_to_anatomy: geometry.world_to_anatomy,
        fields: &geometry.fields,
        anatomy,
        tumour: tumour.as_ref(),
        noise: geometry.noise,
    };
    let Rendered { mut image, labels } = render::render(&scene, &mut stream("noise"));
    let mut max = 0.0f32;
    for v in &mut image {
        *v *= geometry.gain;
        max = max.max(*v);
    }
    let encoding = scanner::random_encoding(max, &mut stream("encoding"));
    Subject {
        plan: plan.clone(),
        grid: geometry.grid,
        world_to_anatomy: geometry.world_to_anatomy,
        image,
        labels,
        encoding,
        sform_code: geometry.sform_code,
    }
}

/// File names of a subject inside the output folder: image and, with a tumour, segmentation.
fn file_names(plan: &SubjectPlan) -> (String, Option<String>) {
    (
        format!("{}.nii.gz", plan.id),
        plan.tumour.then(|| format!("{}_seg.nii.gz", plan.id)),
    )
}

/// Writes a subject's files into `dir` and returns its manifest row.
pub fn write_subject(dir: &Path, subject: &Subject) -> Result<ManifestRow> {
    let (image_name, seg_name) = file_names(&subject.plan);
    let info = HeaderInfo {
        description: format!("mtx-hpc {} synth", crate::TOOL_VERSION),
        sform_code: subject.sform_code,
        qform_code: 1,
    };
    let g = &subject.grid;
    write_nifti_with(
        &dir.join(&image_name),
        g.dims,
        &subject.image,
        &g.affine,
        subject.encoding,
        &info,
    )?;
    if let (Some(name), Some(labels)) = (&seg_name, &subject.labels) {
        let as_f32: Vec<f32> = labels.iter().map(|&l| f32::from(l)).collect();
        write_nifti_with(
            &dir.join(name),
            g.dims,
            &as_f32,
            &g.affine,
            Encoding::UInt8,
            &info,
        )?;
    }
    let p = &subject.plan;
    Ok(ManifestRow {
        subject_id: p.id.clone(),
        session: Some("ses-01".to_string()),
        image: image_name,
        age: Some(p.age),
        sex: Some(p.sex().to_string()),
        diagnosis: Some(p.diagnosis.code().to_string()),
        site: Some(p.site_name().to_string()),
        segmentation: seg_name,
    })
}

/// Creates `out` if missing (its parent must exist: a typo should not grow a folder tree).
fn prepare_output(out: &Path) -> Result<()> {
    if out.is_dir() {
        return Ok(());
    }
    if out.exists() {
        bail!("{}: exists and is not a folder", out.display());
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !parent.is_dir() {
        bail!(
            "{}: cannot create the output folder: {} does not exist",
            out.display(),
            parent.display()
        );
    }
    std::fs::create_dir(out)
        .with_context(|| format!("{}: cannot create the output folder", out.display()))
}

pub fn run(args: &SynthArgs) -> Result<()> {
    ensure!(args.subjects > 0, "--subjects must be at least 1");
    ensure!(
        args.tumour_fraction.is_finite() && (0.0..=1.0).contains(&args.tumour_fraction),
        "--tumour-fraction must be between 0 and 1, got {}",
        args.tumour_fraction
    );
    let started = Instant::now();
    let template = match &args.template {
        Some(path) => Some(Template::load(path)?),
        None => None,
    };
    prepare_output(&args.out)?;
    let plans: Vec<SubjectPlan> = (0..args.subjects)
        .map(|i| plan_subject(args.seed, args.cohort, i, args.tumour_fraction))
        .collect();
    let manifest = args.out.join("manifest.csv");
    if !args.force {
        let mut existing = Vec::new();
        for plan in &plans {
            let (image, seg) = file_names(plan);
            existing.extend(
                std::iter::once(image)
                    .chain(seg)
                    .filter(|n| args.out.join(n).exists()),
            );
        }
        if manifest.exists() {
            existing.push("manifest.csv".to_string());
        }
        if let Some(first) = existing.first() {
            bail!(
                "{}: {} of the files to write already exist{} (use --force to overwrite)",
                args.out.join(first).display(),
                existing.len(),
                if existing.len() > 1 {
                    ", this one among them"
                } else {
                    ""
                }
            );
        }
    }

    let bar = crate::progress::bar(plans.len() as u64, "synth");
    let rows: Vec<ManifestRow> = plans
        .par_iter()
        .map(|plan| {
            let subject = generate(args.seed, args.cohort, plan, template.as_ref());
            let row = write_subject(&args.out, &subject);
            bar.inc(1);
            row
        })
        .collect::<Result<_>>()?;
    bar.finish_and_clear();

    let mut csv = csv::Writer::from_writer(Vec::new());
    for row in &rows {
        csv.serialize(row)
            .with_context(|| format!("{}: cannot encode a row", manifest.display()))?;
    }
    let bytes = csv
        .into_inner()
        .map_err(|e| anyhow::anyhow!("{}: cannot encode: {e}", manifest.display()))?;
    crate::io::write_atomic(&manifest, &bytes, args.force)?;

    let seconds = started.elapsed().as_secs_f64();
    let tumours = plans.iter().filter(|p| p.tumour).count();
    eprintln!(
        "synth: {} {} subjects ({} with tumours, anatomy: {}) in {} in {:.1} s ({:.2} s/subject)",
        plans.len(),
        cohort_key(args.cohort),
        tumours,
        args.template
            .as_ref()
            .map_or("phantom".to_string(), |p| p.display().to_string()),
        args.out.display(),
        seconds,
        seconds / plans.len() as f64
    );
    Ok(())
}
