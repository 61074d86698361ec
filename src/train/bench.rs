//! `mtx-hpc bench step`: the time of one optimizer step of a stage on random volumes (no
//! corpus needed), with throughput, achieved GFLOP/s and peak memory, for docs/PERFORMANCE.md.
use crate::backend::{Adam, Backend};
use crate::model::augment::Curve;
use crate::model::encoder;
use crate::model::objective::{self, Masks, Net};
use crate::model::{Layout, ModelConfig, Part, Plane, init};
use crate::rng;
use anyhow::{Result, bail};
use std::time::Instant;

/// Random smooth volumes in [0, 1]: real variation for the norms, no ties for max-pool.
fn volumes(grid: [usize; 3], b: usize) -> Vec<f32> {
    let mut r = rng::keyed(0, &[], "bench-volumes");
    let [x, y, z] = grid;
    let mut out = Vec::with_capacity(b * x * y * z);
    for s in 0..b {
        for i in 0..x {
            for j in 0..y {
                for k in 0..z {
                    let v = ((i as f32 * 0.21 + s as f32).sin() * (j as f32 * 0.13).cos()
                        + (k as f32 * 0.17).sin())
                        * 0.2
                        + 0.5
                        + 0.05 * rng::unit(&mut r) as f32;
                    out.push(v);
                }
            }
        }
    }
    out
}

/// Peak resident memory of this process (VmHWM), in MiB.
fn peak_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

pub fn run(args: &crate::cli::BenchStepArgs) -> Result<()> {
    if let Some(t) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t.max(1))
            .build_global()?;
    }
    let pretraining = ["triplet", "mevp", "mevp-trainable"].contains(&args.stage.as_str());
    if args.batch == 0 || (pretraining && args.batch % 2 == 1) {
        bail!(
            "--batch must be positive and even (the triplet pairs subjects), got {}",
            args.batch
        );
    }
    struct Job<'a>(&'a crate::cli::BenchStepArgs);
    impl crate::backend::device::OnBackend for Job<'_> {
        type Out = ();
        fn run<B: Backend>(self, be: &B) -> Result<()> {
            run_on(be, self.0)
        }
    }
    crate::backend::device::run_on(args.device, 0, args.tf32, Job(args))
}

/// The timed steps on one backend. Each step ends by reading a parameter back, so a device
/// backend's queued work is inside the step's time.
fn run_on<B: Backend>(be: &B, args: &crate::cli::BenchStepArgs) -> Result<()> {
    if let Ok(task) = args.stage.parse::<crate::downstream::Task>() {
        return bench_finetune(be, args, task);
    }
    let cfg = ModelConfig::preset(args.preset);
    let layout = Layout::new(&cfg);
    let net = Net::new(&cfg);
    let b = args.batch;
    let n = layout.total();
    let mut params = be.upload(&init::init_params(&layout, 0));
    let (mut m, mut v, mut grads) = (be.zeros(n), be.zeros(n), be.zeros(n));
    let anchors = volumes(cfg.grid, b);
    let per: usize = cfg.grid.iter().product();
    let mut positives = anchors.clone();
    for k in 0..b {
        Curve::random(&mut rng::keyed(0, &[k as u64], "bezier"))
            .apply(&mut positives[k * per..(k + 1) * per]);
    }
    let triplet = args.stage == "triplet";
    let trainable = args.stage == "mevp-trainable";
    let part = match args.stage.as_str() {
        "triplet" => layout.part_range(Part::Encoder),
        "mevp" => layout.part_range(Part::Transformer),
        // The whole buffer: the parts are contiguous, transformer then encoder.
        _ => layout.part_range(Part::Transformer).start..layout.part_range(Part::Encoder).end,
    };
    let pos = Plane::ALL.map(|p| {
        be.upload(&init::positions(
            p.geometry(cfg.grid).0,
            cfg.d,
            cfg.pos_base,
        ))
    });
    let tokens = Plane::ALL.map(|p| objective::mask_token(be, &net, &params, &layout, p));
    let masks: Vec<Masks> = (0..b as u64)
        .map(|k| {
            let counts = cfg.masked_per_plane(0.1);
            Plane::ALL.map(|p| {
                rng::choose(
                    &mut rng::keyed(0, &[k], p.name()),
                    p.geometry(cfg.grid).0,
                    counts[p.index()],
                )
            })
        })
        .collect();
    let slices = cfg.slices_per_subject();
    let fwd_flops: f64 = Plane::ALL
        .iter()
        .map(|p| {
            let (n, h, w) = p.geometry(cfg.grid);
            n as f64 * encoder::forward_flops(&net.encoder, h, w)
        })
        .sum();
    // Triplet: forward + backward (about 2x forward) for anchors and positives. MEVP (frozen,
    // uncached): one encoder forward; trainable: forward + backward. The transformer is small
    // next to the encoder and not counted.
    let flops_per_subject = if triplet {
        6.0 * fwd_flops
    } else if trainable {
        3.0 * fwd_flops
    } else {
        fwd_flops
    };
    println!(
        "bench step: preset {}, stage {}, batch {b}, threads {}, {} steps after 1 warm-up",
        cfg.preset,
        args.stage,
        rayon::current_num_threads(),
        args.steps
    );
    let mut times = Vec::new();
    for step in 0..=args.steps {
        let t = Instant::now();
        be.fill(be.view_mut(&mut grads, part.clone()), 0.0);
        let loss = if triplet {
            objective::triplet(
                be,
                &net,
                &params,
                Some(&mut grads),
                &layout,
                &anchors,
                &positives,
                b,
                1.0,
            )
        } else if trainable {
            objective::mevp_trainable(
                be,
                &net,
                &params,
                Some(&mut grads),
                &layout,
                &anchors,
                &pos,
                &masks,
                &objective::MevpOptions::default(),
                None,
            )
        } else {
            let targets = Plane::ALL
                .map(|p| objective::encode_plane(be, &net, &params, &layout, p, &anchors, b));
            objective::mevp(
                be,
                &net,
                &params,
                Some(&mut grads),
                &layout,
                &targets,
                &tokens,
                &pos,
                &masks,
            )
        };
        let h = Adam {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: step as u64 + 1,
        };
        be.adam(
            &h,
            be.view_mut(&mut params, part.clone()),
            be.view(&grads, part.clone()),
            be.view_mut(&mut m, part.clone()),
            be.view_mut(&mut v, part.clone()),
        );
        be.scalar(be.view(&params, part.start..part.start + 1));
        let s = t.elapsed().as_secs_f64();
        if step > 0 {
            times.push(s);
        }
        println!(
            "  step {step}: {s:.3} s, loss {loss:.4}{}",
            if step == 0 { " (warm-up)" } else { "" }
        );
    }
    summary(&mut times, b, slices, flops_per_subject);
    Ok(())
}

/// The median step and what it means in subjects, slices and encoder FLOP per second.
fn summary(times: &mut [f64], b: usize, slices: usize, flops_per_subject: f64) {
    times.sort_by(f64::total_cmp);
    let med = times[times.len() / 2];
    println!(
        "median step {med:.3} s | {:.2} subjects/s | {:.0} slices/s | {:.1} GFLOP/s (encoder, {:.1} GFLOP per subject) | peak memory {}",
        b as f64 / med,
        (b * slices) as f64 / med,
        b as f64 * flops_per_subject / med / 1e9,
        flops_per_subject / 1e9,
        peak_mib().map_or("?".to_string(), |m| format!("{m:.0} MiB"))
    );
}

/// A fine-tuning step of a downstream task (encoder trained): the model `finetune` trains,
/// on random volumes with a spherical three-label "tumour" for segmentation.
fn bench_finetune<B: Backend>(
    be: &B,
    args: &crate::cli::BenchStepArgs,
    task: crate::downstream::Task,
) -> Result<()> {
    use crate::downstream::Task;
    use crate::downstream::finetune::Model;
    use crate::model::Head;
    let cfg = ModelConfig::preset(args.preset);
    let head = match task {
        Task::Diagnosis => Head::Classify,
        Task::Age => Head::Regress,
        Task::Segmentation => Head::Segment,
    };
    let model = Model {
        net: Net::new(&cfg),
        layout: Layout::with_head(&cfg, head),
        task,
        scale: (0.0, 1.0),
        train_encoder: true,
        tumour_weight: 1.0,
    };
    let n = model.layout.total();
    let b = args.batch;
    let mut params = be.upload(&init::init_params(&model.layout, 0));
    let (mut m, mut v, mut grads) = (be.zeros(n), be.zeros(n), be.zeros(n));
    let vols = volumes(cfg.grid, b);
    let [gx, gy, gz] = cfg.grid;
    let mut labels = vec![0u8; vols.len()];
    for s in 0..b {
        for (i, l) in labels[s * gx * gy * gz..(s + 1) * gx * gy * gz]
            .iter_mut()
            .enumerate()
        {
            let (x, y, z) = (i / (gy * gz), (i / gz) % gy, i % gz);
            let r2 = [(x, gx), (y, gy), (z, gz)]
                .iter()
                .map(|&(c, g)| (c as f64 / g as f64 - 0.5).powi(2))
                .sum::<f64>();
            *l = if r2 < 0.002 {
                1
            } else if r2 < 0.005 {
                4
            } else if r2 < 0.01 {
                2
            } else {
                0
            };
        }
    }
    let targets: Vec<f64> = (0..b).map(|k| (k % 2) as f64).collect();
    let pos = model.positions(be, &cfg);
    let fwd_flops: f64 = Plane::ALL
        .iter()
        .map(|p| {
            let (n, h, w) = p.geometry(cfg.grid);
            n as f64 * encoder::forward_flops(&model.net.encoder, h, w)
        })
        .sum();
    println!(
        "bench step: preset {}, fine-tuning {task} (encoder trained), batch {b}, threads {}, {} steps after 1 warm-up",
        cfg.preset,
        rayon::current_num_threads(),
        args.steps
    );
    let mut times = Vec::new();
    for step in 0..=args.steps {
        let t = Instant::now();
        be.fill(be.view_mut(&mut grads, 0..n), 0.0);
        let (loss, _) = model.batch(
            be,
            &params,
            Some(&mut grads),
            &pos,
            &vols,
            &labels,
            &targets,
            false,
        )?;
        let h = Adam {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step: step as u64 + 1,
        };
        be.adam(
            &h,
            be.view_mut(&mut params, 0..n),
            be.view(&grads, 0..n),
            be.view_mut(&mut m, 0..n),
            be.view_mut(&mut v, 0..n),
        );
        be.scalar(be.view(&params, 0..1));
        let s = t.elapsed().as_secs_f64();
        if step > 0 {
            times.push(s);
        }
        println!(
            "  step {step}: {s:.3} s, loss {loss:.4}{}",
            if step == 0 { " (warm-up)" } else { "" }
        );
    }
    // Encoder forward + backward (about 3x forward); the transformer and the decoder are not
    // counted.
    summary(&mut times, b, cfg.slices_per_subject(), 3.0 * fwd_flops);
    Ok(())
}
