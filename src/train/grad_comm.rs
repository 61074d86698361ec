//! How gradients are summed over ranks: `--grad-comm auto|mpi|nccl`, decided once per run by
//! every rank together.
//!
//! - **mpi** (host staging, [`HostStaged`]): each bucket is downloaded to the host, summed by
//!   MPI on the reduction thread and uploaded back. Works for every backend and every world.
//! - **nccl** (feature `nccl`, backend/cuda/nccl.rs): each bucket is summed by NCCL in GPU
//!   memory on its own CUDA stream. Needs every rank on a CUDA GPU of its own, and NCCL's
//!   library on every node.
//! - **auto**: nccl when this binary has it and every condition holds, else mpi (with a
//!   notice when a GPU run could have used NCCL but cannot).
//!
//! The facts behind the choice differ between ranks (one node may lack the library, one node
//! may put two ranks on one GPU), so each rank describes itself in a fixed-size record
//! ([`RankFacts`]), every rank gathers all records, and every rank reaches the same decision
//! from the same table: a refusal is a [`Collective`] error, never a rank left waiting.
use super::overlap::{BucketReduce, HostStaged, Reduced};
use crate::backend::Backend;
use crate::dist::{Collective, World};
use anyhow::{Result, bail};
use std::ops::Range;

/// What the user asked for (`--grad-comm`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GradCommRequest {
    /// NCCL when built with it and every rank has a GPU of its own, else MPI host staging.
    #[default]
    Auto,
    /// MPI all-reduce of host copies (every backend).
    Mpi,
    /// NCCL in GPU memory, or an error saying why not.
    Nccl,
}

/// The way chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradPath {
    /// A world of one: nothing to sum.
    Local,
    /// MPI host staging.
    Mpi,
    /// NCCL in GPU memory.
    Nccl,
}

/// The decision and, when `auto` could not use NCCL on a GPU run, a notice for rank 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Choice {
    pub path: GradPath,
    pub notice: Option<String>,
}

/// The GPU a rank computes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gpu {
    /// CUDA's device number in this process (depends on CUDA_VISIBLE_DEVICES).
    pub ordinal: u32,
    /// The device's UUID (the same GPU has the same one in every process).
    pub uuid: Option<[u8; 16]>,
}

/// What one rank tells the others before the choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankFacts {
    /// Its node ([`World::node`]).
    pub node: u64,
    /// Its GPU, or None when it computes on the CPU.
    pub gpu: Option<Gpu>,
    /// Whether the NCCL library loads on it.
    pub nccl_library: bool,
}

const HAS_GPU: u8 = 1;
const HAS_UUID: u8 = 2;
const HAS_NCCL: u8 = 4;

impl RankFacts {
    /// Bytes of a record: node (u64 LE), flags, ordinal (u32 LE), UUID (16).
    pub const BYTES: usize = 8 + 1 + 4 + 16;

    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut b = [0u8; Self::BYTES];
        b[..8].copy_from_slice(&self.node.to_le_bytes());
        let mut flags = 0;
        if self.nccl_library {
            flags |= HAS_NCCL;
        }
        if let Some(g) = &self.gpu {
            flags |= HAS_GPU;
            b[9..13].copy_from_slice(&g.ordinal.to_le_bytes());
            if let Some(u) = &g.uuid {
                flags |= HAS_UUID;
                b[13..].copy_from_slice(u);
            }
        }
        b[8] = flags;
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != Self::BYTES {
            bail!(
                "a rank's record has {} bytes, expected {} (ranks of different builds?)",
                b.len(),
                Self::BYTES
            );
        }
        let flags = b[8];
        if flags & !(HAS_GPU | HAS_UUID | HAS_NCCL) != 0 || flags & (HAS_GPU | HAS_UUID) == HAS_UUID
        {
            bail!("a rank's record has invalid flags {flags:#04x}");
        }
        let node = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
        let gpu = (flags & HAS_GPU != 0).then(|| Gpu {
            ordinal: u32::from_le_bytes(b[9..13].try_into().expect("4 bytes")),
            uuid: (flags & HAS_UUID != 0).then(|| b[13..].try_into().expect("16 bytes")),
        });
        Ok(RankFacts {
            node,
            gpu,
            nccl_library: flags & HAS_NCCL != 0,
        })
    }
}

/// Whether two GPU records name the same device: by UUID when both are known (ordinals
/// repeat when each rank sees only its own GPU through CUDA_VISIBLE_DEVICES), else by
/// ordinal.
fn same_device(a: &Gpu, b: &Gpu) -> bool {
    match (&a.uuid, &b.uuid) {
        (Some(x), Some(y)) => x == y,
        _ => a.ordinal == b.ordinal,
    }
}

/// The first two ranks (by rank) that compute on the same GPU of one node, if any.
pub fn shared_gpu(ranks: &[RankFacts]) -> Option<(usize, usize)> {
    for (i, a) in ranks.iter().enumerate() {
        for (j, b) in ranks.iter().enumerate().skip(i + 1) {
            if let (Some(ga), Some(gb)) = (&a.gpu, &b.gpu)
                && a.node == b.node
                && same_device(ga, gb)
            {
                return Some((i, j));
            }
        }
    }
    None
}

/// "rank 3", "ranks 0, 1 and 5", at most eight named.
fn list_ranks(ranks: &[usize]) -> String {
    let named: Vec<String> = ranks.iter().take(8).map(|r| r.to_string()).collect();
    let more = ranks.len().saturating_sub(named.len());
    match (named.len(), more) {
        (1, _) => format!("rank {}", named[0]),
        (_, 0) => format!(
            "ranks {} and {}",
            named[..named.len() - 1].join(", "),
            named[named.len() - 1]
        ),
        _ => format!("ranks {} and {more} more", named.join(", ")),
    }
}

/// The decision for `req` given every rank's record (in rank order) and whether this binary
/// has the `nccl` feature. Pure, so every path is tested without a GPU; every rank computes it
/// from the same table and gets the same answer.
pub fn decide(req: GradCommRequest, nccl_built: bool, ranks: &[RankFacts]) -> Result<Choice> {
    let choice = |path| Ok(Choice { path, notice: None });
    if req == GradCommRequest::Nccl && !nccl_built {
        bail!(
            "--grad-comm nccl: this mtx-hpc was built without the `nccl` feature (cargo build \
             --features nccl). HINT: use --grad-comm auto (or mpi)"
        );
    }
    if ranks.len() <= 1 {
        return choice(GradPath::Local);
    }
    if req == GradCommRequest::Mpi || !nccl_built {
        return choice(GradPath::Mpi);
    }
    let on_cpu: Vec<usize> = (0..ranks.len())
        .filter(|&r| ranks[r].gpu.is_none())
        .collect();
    let missing: Vec<usize> = (0..ranks.len())
        .filter(|&r| !ranks[r].nccl_library)
        .collect();
    let why = if !on_cpu.is_empty() {
        // A CPU run under auto is the ordinary case: nothing to say.
        if on_cpu.len() == ranks.len() && req == GradCommRequest::Auto {
            return choice(GradPath::Mpi);
        }
        format!(
            "NCCL sums GPU memory, but {} of {} {} on the CPU (--device)",
            list_ranks(&on_cpu),
            ranks.len(),
            if on_cpu.len() == 1 {
                "computes"
            } else {
                "compute"
            }
        )
    } else if !missing.is_empty() {
        format!(
            "the NCCL library (libnccl.so) does not load on {}: put the folder that holds it \
             on LD_LIBRARY_PATH (the PyPI wheel nvidia-nccl-cu13 ships only libnccl.so.2: add \
             a link named libnccl.so to it)",
            list_ranks(&missing)
        )
    } else if let Some((a, b)) = shared_gpu(ranks) {
        let ordinal = ranks[a].gpu.map_or(0, |g| g.ordinal);
        format!(
            "ranks {a} and {b} compute on the same GPU (device {ordinal} of one node) and NCCL \
             refuses two ranks on one GPU"
        )
    } else {
        return choice(GradPath::Nccl);
    };
    match req {
        GradCommRequest::Nccl => {
            bail!("--grad-comm nccl: {why}. HINT: use --grad-comm auto (or mpi)")
        }
        _ => Ok(Choice {
            path: GradPath::Mpi,
            notice: Some(format!(
                "--grad-comm auto: {why}; summing gradients with MPI from host copies instead"
            )),
        }),
    }
}

/// Every rank's record, in rank order (collective).
pub fn gather(world: &World, mine: &RankFacts) -> Result<Vec<RankFacts>> {
    world
        .all_gather_bytes(&mine.encode())
        .iter()
        .map(|b| RankFacts::decode(b))
        .collect()
}

/// Gathers the records and decides (collective). A refusal is the same on every rank, so
/// it is a [`Collective`] error; rank 0 prints the notice.
pub fn choose(req: GradCommRequest, world: &World, mine: &RankFacts) -> Result<Choice> {
    let all = gather(world, mine)?;
    let choice = decide(req, cfg!(feature = "nccl"), &all)
        .map_err(|e| Collective::new(world, 1, format!("{e:#}")))?;
    if let (Some(n), true) = (&choice.notice, world.is_root()) {
        println!("{n}");
    }
    Ok(choice)
}

/// NCCL's version number as text: 22703 -> "2.27.3" (2804 -> "2.8.4" before 2.9).
pub fn nccl_version_string(code: i32) -> String {
    let (major, rest) = if code >= 10000 {
        (code / 10000, code % 10000)
    } else {
        (code / 1000, code % 1000)
    };
    format!("{major}.{}.{}", rest / 100, rest % 100)
}

/// Bytes of an NCCL unique id (ncclUniqueId).
pub const NCCL_ID_BYTES: usize = 128;
const FRAME_ID: u8 = 1;
const FRAME_ERROR: u8 = 0;

/// What rank 0 broadcasts before the NCCL communicator opens: the id, or why it could not
/// make one (so every rank stops together instead of waiting in ncclCommInitRank).
pub fn id_frame(id: std::result::Result<&[u8; NCCL_ID_BYTES], &str>) -> Vec<u8> {
    match id {
        Ok(id) => [&[FRAME_ID][..], &id[..]].concat(),
        Err(why) => [&[FRAME_ERROR][..], why.as_bytes()].concat(),
    }
}

/// The id in a frame from [`id_frame`], or the reason there is none.
pub fn read_id_frame(frame: &[u8]) -> Result<[u8; NCCL_ID_BYTES]> {
    match frame.split_first() {
        None => bail!("no NCCL id arrived from rank 0 (empty message)"),
        Some((&FRAME_ID, id)) => match <[u8; NCCL_ID_BYTES]>::try_from(id) {
            Ok(id) => Ok(id),
            Err(_) => bail!(
                "the NCCL id from rank 0 has {} bytes, expected {NCCL_ID_BYTES}",
                id.len()
            ),
        },
        Some((&FRAME_ERROR, why)) => bail!(
            "rank 0 could not create the NCCL id: {}",
            String::from_utf8_lossy(why)
        ),
        Some((tag, _)) => bail!("the NCCL id message from rank 0 has an unknown tag {tag}"),
    }
}

/// The run's way of summing gradient buckets over ranks (none for a world of one).
pub enum Reducer {
    Host(HostStaged),
    #[cfg(feature = "nccl")]
    Nccl(crate::backend::cuda::nccl::NcclReduce),
}

impl Reducer {
    /// One line for rank 0's log.
    pub fn describe(&self, world: &World) -> String {
        match self {
            Reducer::Host(_) => format!(
                "gradients: summed over {} ranks by MPI from host copies",
                world.size
            ),
            #[cfg(feature = "nccl")]
            Reducer::Nccl(n) => format!(
                "gradients: summed over {} ranks by NCCL {} in GPU memory",
                world.size,
                n.version()
            ),
        }
    }
}

impl BucketReduce for Reducer {
    fn start<B: Backend>(&self, be: &B, grads: &B::Buf, id: usize, range: Range<usize>) {
        match self {
            Reducer::Host(h) => h.start(be, grads, id, range),
            #[cfg(feature = "nccl")]
            Reducer::Nccl(n) => n.start(be, grads, id, range),
        }
    }

    fn finish<B: Backend>(&self, be: &B, grads: &mut B::Buf, buckets: &[Range<usize>]) -> Reduced {
        match self {
            Reducer::Host(h) => h.finish(be, grads, buckets),
            #[cfg(feature = "nccl")]
            Reducer::Nccl(n) => n.finish(be, grads, buckets),
        }
    }
}

/// The host-staged reducer (None for a world of one).
fn host(world: &World) -> Option<Reducer> {
    HostStaged::new(world).map(Reducer::Host)
}

/// The reducer of a run on the CPU backend (collective: every rank calls it).
pub fn for_cpu(req: GradCommRequest, world: &World) -> Result<Option<Reducer>> {
    let mine = RankFacts {
        node: world.node as u64,
        gpu: None,
        nccl_library: false,
    };
    match choose(req, world, &mine)?.path {
        GradPath::Local => Ok(None),
        GradPath::Mpi => Ok(host(world)),
        GradPath::Nccl => bail!("bug: NCCL chosen for a rank on the CPU"),
    }
}

/// Whether NCCL's library loads here (always false without the `nccl` feature). Looked for
/// before any NCCL call: cudarc's dynamic loading panics on a missing library.
pub fn nccl_library_present() -> bool {
    #[cfg(feature = "nccl")]
    {
        // SAFETY: only tries to open the library.
        unsafe { cudarc::nccl::sys::is_culib_present() }
    }
    #[cfg(not(feature = "nccl"))]
    false
}

/// The reducer of a run on the CUDA backend `be` (collective: every rank calls it).
#[cfg(feature = "cuda")]
pub fn for_cuda(
    req: GradCommRequest,
    world: &World,
    be: &crate::backend::cuda::Cuda,
) -> Result<Option<Reducer>> {
    let info = be.info();
    let mine = RankFacts {
        node: world.node as u64,
        gpu: Some(Gpu {
            ordinal: info.ordinal as u32,
            uuid: info.uuid,
        }),
        // Not even looked for when it cannot be used (one rank, or mpi asked for).
        nccl_library: world.size > 1 && req != GradCommRequest::Mpi && nccl_library_present(),
    };
    match choose(req, world, &mine)?.path {
        GradPath::Local => Ok(None),
        GradPath::Mpi => Ok(host(world)),
        #[cfg(feature = "nccl")]
        GradPath::Nccl => Ok(Some(Reducer::Nccl(
            crate::backend::cuda::nccl::NcclReduce::open(world, be)?,
        ))),
        #[cfg(not(feature = "nccl"))]
        GradPath::Nccl => bail!("bug: NCCL chosen in a build without the `nccl` feature"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use GradCommRequest::{Auto, Mpi, Nccl};

    fn gpu(node: u64, ordinal: u32, uuid: Option<u8>) -> RankFacts {
        RankFacts {
            node,
            gpu: Some(Gpu {
                ordinal,
                uuid: uuid.map(|u| [u; 16]),
            }),
            nccl_library: true,
        }
    }

    fn cpu(node: u64) -> RankFacts {
        RankFacts {
            node,
            gpu: None,
            nccl_library: false,
        }
    }

    /// Two nodes of two GPUs each, every rank on its own GPU.
    fn cluster() -> Vec<RankFacts> {
        vec![
            gpu(0, 0, Some(10)),
            gpu(0, 1, Some(11)),
            gpu(2, 0, Some(20)),
            gpu(2, 1, Some(21)),
        ]
    }

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        for r in [
            gpu(7, 3, Some(0xab)),
            gpu(u64::MAX, u32::MAX, None),
            cpu(5),
            RankFacts {
                nccl_library: false,
                ..gpu(1, 0, Some(1))
            },
        ] {
            let b = r.encode();
            assert_eq!(b.len(), RankFacts::BYTES);
            assert_eq!(RankFacts::decode(&b).unwrap(), r);
        }
        let b = gpu(7, 3, Some(1)).encode();
        assert!(RankFacts::decode(&b[..RankFacts::BYTES - 1]).is_err());
        let mut bad = b;
        bad[8] = 0x80;
        assert!(RankFacts::decode(&bad).is_err());
        // A UUID without a GPU is not a record any rank writes.
        bad[8] = HAS_UUID;
        assert!(RankFacts::decode(&bad).is_err());
    }

    #[test]
    fn the_same_gpu_on_one_node_is_found() {
        assert_eq!(shared_gpu(&cluster()), None);
        // The one-GPU machine: two ranks, both device 0 with the same UUID.
        assert_eq!(
            shared_gpu(&[gpu(0, 0, Some(9)), gpu(0, 0, Some(9))]),
            Some((0, 1))
        );
        // Device 0 on two nodes is two GPUs.
        assert_eq!(shared_gpu(&[gpu(0, 0, Some(9)), gpu(1, 0, Some(9))]), None);
        // Slurm binding one GPU per task: every rank sees device 0, the UUIDs differ.
        assert_eq!(shared_gpu(&[gpu(0, 0, Some(1)), gpu(0, 0, Some(2))]), None);
        // Without UUIDs the ordinal decides.
        assert_eq!(
            shared_gpu(&[gpu(0, 0, None), gpu(0, 0, Some(2))]),
            Some((0, 1))
        );
        assert_eq!(shared_gpu(&[gpu(0, 0, None), gpu(0, 1, None)]), None);
        // The first pair by rank; CPU ranks never share.
        let mixed = [
            cpu(0),
            cpu(0),
            gpu(0, 1, None),
            gpu(0, 0, None),
            gpu(0, 1, None),
        ];
        assert_eq!(shared_gpu(&mixed), Some((2, 4)));
    }

    #[test]
    fn auto_takes_nccl_only_when_every_rank_can() {
        let nccl = decide(Auto, true, &cluster()).unwrap();
        assert_eq!((nccl.path, nccl.notice), (GradPath::Nccl, None));
        assert_eq!(decide(Nccl, true, &cluster()).unwrap().path, GradPath::Nccl);
        // Without the feature, or when mpi is asked for: MPI, silently.
        for (req, built) in [(Auto, false), (Mpi, true), (Mpi, false)] {
            let c = decide(req, built, &cluster()).unwrap();
            assert_eq!((c.path, c.notice), (GradPath::Mpi, None), "{req:?} {built}");
        }
        // A CPU run under auto is the ordinary case.
        let c = decide(Auto, true, &[cpu(0), cpu(0)]).unwrap();
        assert_eq!((c.path, c.notice), (GradPath::Mpi, None));
    }

    #[test]
    fn one_rank_sums_nothing() {
        for req in [Auto, Mpi, Nccl] {
            assert_eq!(
                decide(req, true, &[gpu(0, 0, None)]).unwrap().path,
                GradPath::Local
            );
        }
        assert_eq!(
            decide(Auto, false, &[cpu(0)]).unwrap().path,
            GradPath::Local
        );
        // Asking a build without NCCL for it is an error even alone: the job script is wrong.
        let e = decide(Nccl, false, &[cpu(0)]).unwrap_err().to_string();
        assert!(e.contains("without the `nccl` feature"), "{e}");
    }

    #[test]
    fn what_stops_nccl_is_a_notice_under_auto_and_an_error_under_nccl() {
        let shared = vec![gpu(0, 0, Some(9)), gpu(0, 0, Some(9))];
        let mut no_lib = cluster();
        no_lib[2].nccl_library = false;
        no_lib[3].nccl_library = false;
        let mut one_cpu = cluster();
        one_cpu[1] = cpu(0);
        let all_cpu = vec![cpu(0), cpu(1)];
        for (facts, says) in [
            (&shared, "ranks 0 and 1 compute on the same GPU (device 0"),
            (&no_lib, "does not load on ranks 2 and 3"),
            (&one_cpu, "rank 1 of 4 computes on the CPU"),
        ] {
            let c = decide(Auto, true, facts).unwrap();
            assert_eq!(c.path, GradPath::Mpi);
            let n = c.notice.expect("a notice");
            assert!(
                n.starts_with("--grad-comm auto: ") && n.contains(says),
                "{n}"
            );
            let e = decide(Nccl, true, facts).unwrap_err().to_string();
            assert!(
                e.starts_with("--grad-comm nccl: ") && e.contains(says),
                "{e}"
            );
            assert!(e.contains("HINT: use --grad-comm auto"), "{e}");
        }
        let e = decide(Nccl, true, &all_cpu).unwrap_err().to_string();
        assert!(e.contains("ranks 0 and 1 of 2 compute on the CPU"), "{e}");
        // The library message says how to fix the wheel's missing libnccl.so.
        let n = decide(Auto, true, &no_lib).unwrap().notice.unwrap();
        assert!(n.contains("libnccl.so.2"), "{n}");
    }

    #[test]
    fn rank_lists_read_well() {
        assert_eq!(list_ranks(&[3]), "rank 3");
        assert_eq!(list_ranks(&[0, 1, 5]), "ranks 0, 1 and 5");
        let many: Vec<usize> = (0..11).collect();
        assert_eq!(list_ranks(&many), "ranks 0, 1, 2, 3, 4, 5, 6, 7 and 3 more");
    }

    #[test]
    fn the_nccl_id_travels_in_a_frame() {
        let mut id = [0u8; NCCL_ID_BYTES];
        for (i, b) in id.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8;
        }
        let frame = id_frame(Ok(&id));
        assert_eq!(frame.len(), 1 + NCCL_ID_BYTES);
        assert_eq!(read_id_frame(&frame).unwrap(), id);
        // Rank 0's failure reaches every rank as an error naming the cause.
        let e = read_id_frame(&id_frame(Err("ncclSystemError: no socket")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "rank 0 could not create the NCCL id: ncclSystemError: no socket"
        );
        assert!(read_id_frame(&[]).is_err());
        assert!(
            read_id_frame(&frame[..100])
                .unwrap_err()
                .to_string()
                .contains("99 bytes")
        );
        let mut odd = frame.clone();
        odd[0] = 7;
        assert!(
            read_id_frame(&odd)
                .unwrap_err()
                .to_string()
                .contains("tag 7")
        );
    }

    #[test]
    fn the_same_world_of_one_record_comes_back() {
        let w = World::single();
        let mine = gpu(0, 2, Some(4));
        assert_eq!(gather(&w, &mine).unwrap(), vec![mine]);
        assert_eq!(choose(Auto, &w, &mine).unwrap().path, GradPath::Local);
        assert!(for_cpu(Auto, &w).unwrap().is_none());
    }

    #[test]
    fn nccl_versions() {
        assert_eq!(nccl_version_string(22703), "2.27.3");
        assert_eq!(nccl_version_string(23000), "2.30.0");
        assert_eq!(nccl_version_string(2804), "2.8.4");
    }
}
