//! The world of ranks. Started plainly, the program is a world of one and MPI is never
//! initialised; started by a launcher (`mpirun`, `srun`, hydra), rank and world size come from
//! MPI and the local rank from MPI's shared-memory split. The launcher's own variables give the
//! size it started; a different MPI world (a binary built for another MPI runs as N separate
//! worlds of one) is an error that says so, never N independent trainings.
//!
//! Collectives take host slices. Errors after MPI started must end the whole job: see
//! [`World::fail`], which the pretraining entry point calls for every error that is not the
//! same on every rank.
use anyhow::{Result, bail};
use serde::Deserialize;

/// Variables the launchers set (read through `envy`; empty values count as unset).
#[derive(Debug, Default, Deserialize)]
pub struct LauncherEnv {
    /// OpenMPI's mpirun.
    pub ompi_comm_world_size: Option<String>,
    pub ompi_comm_world_rank: Option<String>,
    /// MPICH/hydra, and srun with PMI-2.
    pub pmi_size: Option<String>,
    pub pmi_rank: Option<String>,
    /// PMIx (srun --mpi=pmix, OpenMPI 4+).
    pub pmix_rank: Option<String>,
    /// srun: tasks of this job step and this task's index.
    pub slurm_step_num_tasks: Option<String>,
    pub slurm_procid: Option<String>,
    pub slurm_step_id: Option<String>,
}

/// Slurm's description of the job, for logs, thread counts and requeues.
#[derive(Debug, Default, Deserialize)]
pub struct SlurmEnv {
    pub slurm_job_id: Option<String>,
    pub slurm_array_job_id: Option<String>,
    pub slurm_array_task_id: Option<String>,
    pub slurm_cpus_per_task: Option<String>,
    pub slurm_restart_count: Option<String>,
    pub slurm_job_name: Option<String>,
    pub slurm_nodeid: Option<String>,
}

fn number(v: &Option<String>) -> Option<usize> {
    v.as_deref().and_then(|s| s.trim().parse().ok())
}

impl LauncherEnv {
    pub fn from_env() -> Self {
        envy::from_env().unwrap_or_default()
    }

    /// The number of processes the launcher says it started, when one did.
    pub fn size(&self) -> Option<usize> {
        number(&self.ompi_comm_world_size)
            .or(number(&self.pmi_size))
            // srun sets SLURM_PROCID for each task of a step; a plain process inside a batch
            // script has SLURM_* job variables but is not one of N tasks.
            .or_else(|| {
                self.slurm_procid
                    .as_ref()
                    .and(self.slurm_step_id.as_ref())
                    .and(number(&self.slurm_step_num_tasks))
            })
    }

    /// Whether some launcher started this process (so MPI must be initialised).
    pub fn launched(&self) -> bool {
        self.size().is_some() || number(&self.pmix_rank).is_some()
    }

    /// Which launcher variable gave the size, for error messages.
    fn describe(&self) -> String {
        let pairs = [
            ("OMPI_COMM_WORLD_SIZE", &self.ompi_comm_world_size),
            ("PMI_SIZE", &self.pmi_size),
            ("SLURM_STEP_NUM_TASKS", &self.slurm_step_num_tasks),
        ];
        pairs
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl SlurmEnv {
    pub fn from_env() -> Self {
        envy::from_env().unwrap_or_default()
    }

    /// SLURM_CPUS_PER_TASK, when set and a positive number.
    pub fn cpus_per_task(&self) -> Option<usize> {
        number(&self.slurm_cpus_per_task).filter(|&n| n > 0)
    }

    pub fn restart_count(&self) -> usize {
        number(&self.slurm_restart_count).unwrap_or(0)
    }

    /// "job 123 (array 120_3, restart 1)" for the log, or None outside Slurm.
    pub fn describe(&self) -> Option<String> {
        let id = self.slurm_job_id.as_ref()?;
        let mut s = format!("Slurm job {id}");
        if let (Some(a), Some(t)) = (&self.slurm_array_job_id, &self.slurm_array_task_id) {
            s += &format!(" (array {a}_{t})");
        }
        if self.restart_count() > 0 {
            s += &format!(", restart {}", self.restart_count());
        }
        Some(s)
    }
}

/// An error every rank reached together, from a decision taken on all-reduced values (a
/// non-finite loss, a stop signal) or on inputs every rank checks alike (the configuration):
/// nobody waits in a collective, so no MPI_Abort is needed. Rank 0 reports it; every rank
/// exits with `code`.
#[derive(Debug)]
pub struct Collective {
    pub code: u8,
    pub message: String,
    /// Whether this rank prints the message (rank 0 only).
    pub report: bool,
}

impl Collective {
    pub fn new(world: &World, code: u8, message: String) -> Self {
        Collective {
            code,
            message,
            report: world.is_root(),
        }
    }
}

impl std::fmt::Display for Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Collective {}

/// Reduction of [`World::all_reduce_f64`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Sum,
    Min,
    Max,
}

/// This process's place in the job.
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Index among the ranks on this node, and their number.
    pub local_rank: usize,
    pub local_size: usize,
    /// This rank's node, named by the world rank of the node's local rank 0 (ranks on one
    /// node have the same value, ranks on different nodes different ones).
    pub node: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<MpiWorld>,
}

#[cfg(feature = "mpi")]
struct MpiWorld {
    world: mpi::topology::SimpleCommunicator,
    node: mpi::topology::SimpleCommunicator,
    /// Finalises MPI when dropped: declared last so the communicators go first.
    _universe: mpi::environment::Universe,
}

impl World {
    /// A world of one, without MPI.
    pub fn single() -> Self {
        World {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            node: 0,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// The world this process was started in (see the module comment).
    pub fn init() -> Result<Self> {
        let env = LauncherEnv::from_env();
        if !env.launched() {
            return Ok(Self::single());
        }
        Self::init_mpi(&env)
    }

    #[cfg(not(feature = "mpi"))]
    fn init_mpi(env: &LauncherEnv) -> Result<Self> {
        match env.size() {
            Some(n) if n > 1 => bail!(
                "started as one of {n} processes ({}) but this binary was built without MPI \
                 (cargo feature `mpi`): rebuild with it, or start a single process",
                env.describe()
            ),
            _ => Ok(Self::single()),
        }
    }

    #[cfg(feature = "mpi")]
    fn init_mpi(env: &LauncherEnv) -> Result<Self> {
        use mpi::topology::Communicator;
        // The gradient thread calls MPI while the main thread waits for it, never both at
        // once: MPI_THREAD_SERIALIZED is enough.
        let Some((universe, level)) = mpi::initialize_with_threading(mpi::Threading::Serialized)
        else {
            bail!("MPI was already initialised in this process");
        };
        if level < mpi::Threading::Serialized {
            bail!(
                "the MPI library offers thread level {level:?}; mtx-hpc needs Serialized \
                 (OpenMPI and MPICH builds normally do)"
            );
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if let Some(expected) = env.size()
            && expected != size
        {
            bail!(
                "the launcher started {expected} processes ({}) but MPI sees a world of \
                 {size}: this binary's MPI library is not the launcher's (e.g. built against \
                 MPICH, started by OpenMPI's mpirun, or srun without --mpi=pmix). Rebuild \
                 against the cluster's MPI module or launch with its own mpirun",
                env.describe()
            );
        }
        let node = world.split_shared(rank as i32);
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        let mut leader = [rank as u64];
        {
            use mpi::collective::Root;
            node.process_at_rank(0).broadcast_into(&mut leader[..]);
        }
        let w = World {
            rank,
            size,
            local_rank,
            local_size,
            node: leader[0] as usize,
            mpi: Some(MpiWorld {
                world,
                node,
                _universe: universe,
            }),
        };
        if size > 1 {
            install_abort_on_panic();
        }
        Ok(w)
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Waits for every rank.
    pub fn barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::CommunicatorCollectives;
            m.world.barrier();
        }
    }

    /// Waits for every rank on this node.
    pub fn node_barrier(&self) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::CommunicatorCollectives;
            m.node.barrier();
        }
    }

    /// Element-wise reduction of `values` over all ranks, in place.
    pub fn all_reduce_f64(&self, values: &mut [f64], op: Op) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            let send = values.to_vec();
            let op = match op {
                Op::Sum => SystemOperation::sum(),
                Op::Min => SystemOperation::min(),
                Op::Max => SystemOperation::max(),
            };
            m.world.all_reduce_into(&send[..], values, op);
        }
        let _ = (values, op);
    }

    /// `recv = sum over ranks of send` (f32, the gradients).
    pub fn sum_f32(&self, send: &[f32], recv: &mut [f32]) {
        assert_eq!(send.len(), recv.len());
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::{CommunicatorCollectives, SystemOperation};
            m.world.all_reduce_into(send, recv, SystemOperation::sum());
            return;
        }
        recv.copy_from_slice(send);
    }

    /// Rank 0's `values` on every rank.
    pub fn broadcast_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::Root;
            use mpi::topology::Communicator;
            m.world.process_at_rank(0).broadcast_into(values);
        }
        let _ = values;
    }

    /// Rank 0's bytes on every rank (any length).
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::Root;
            use mpi::topology::Communicator;
            let root = m.world.process_at_rank(0);
            let mut len = [bytes.len() as u64];
            root.broadcast_into(&mut len[..]);
            bytes.resize(len[0] as usize, 0);
            // An empty Vec's pointer is dangling, which MPI rejects even for 0 elements.
            if !bytes.is_empty() {
                root.broadcast_into(&mut bytes[..]);
            }
        }
        let _ = bytes;
    }

    /// Every rank's `mine`, in rank order (every rank passes the same number of bytes).
    pub fn all_gather_bytes(&self, mine: &[u8]) -> Vec<Vec<u8>> {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi {
            use mpi::collective::CommunicatorCollectives;
            // A length that differs between ranks would be undefined behaviour inside MPI:
            // check it first (an empty record is pointless, and its pointer dangles).
            let mut lens = [mine.len() as f64, -(mine.len() as f64)];
            self.all_reduce_f64(&mut lens, Op::Max);
            assert!(
                lens[0] == -lens[1] && !mine.is_empty(),
                "all_gather_bytes: records of different or zero lengths"
            );
            let mut all = vec![0u8; mine.len() * self.size];
            m.world.all_gather_into(mine, &mut all[..]);
            return all.chunks(mine.len()).map(<[u8]>::to_vec).collect();
        }
        vec![mine.to_vec()]
    }

    /// Ends the whole job from this rank: MPI_Abort when several ranks run (an uncoordinated
    /// exit would leave the others waiting in a collective forever), a plain exit otherwise.
    pub fn abort(&self, code: i32) -> ! {
        #[cfg(feature = "mpi")]
        if let Some(m) = &self.mpi
            && self.size > 1
        {
            use mpi::topology::Communicator;
            m.world.abort(code);
        }
        std::process::exit(code)
    }

    /// "rank 3/8 (local 1/4)" for messages.
    pub fn describe(&self) -> String {
        format!(
            "rank {}/{} (local {}/{})",
            self.rank, self.size, self.local_rank, self.local_size
        )
    }
}

/// A thread that sums f32 buffers over all ranks, one job at a time in the order sent, so the
/// caller can go on computing while a reduction runs. The caller must not call MPI itself
/// between sending a job and receiving its result (the library runs at thread level
/// Serialized).
pub struct CommThread {
    tx: Option<std::sync::mpsc::Sender<(usize, Vec<f32>)>>,
    rx: std::sync::mpsc::Receiver<(usize, Vec<f32>, f64)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CommThread {
    /// Queues the sum over ranks of `data`; job `id` comes back from [`CommThread::recv`].
    pub fn send(&self, id: usize, data: Vec<f32>) {
        self.tx
            .as_ref()
            .expect("open until drop")
            .send((id, data))
            .expect("the reduction thread ended");
    }

    /// The next finished job: its id, the summed data and the seconds the reduction took.
    pub fn recv(&self) -> (usize, Vec<f32>, f64) {
        self.rx.recv().expect("the reduction thread ended")
    }
}

impl Drop for CommThread {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl World {
    /// A reduction thread over this world, or None for a world of one.
    pub fn comm_thread(&self) -> Option<CommThread> {
        #[cfg(feature = "mpi")]
        if self.mpi.is_some() && self.size > 1 {
            let (tx, jobs) = std::sync::mpsc::channel::<(usize, Vec<f32>)>();
            let (done, rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name("allreduce".into())
                .spawn(move || {
                    use mpi::collective::{CommunicatorCollectives, SystemOperation};
                    let world = mpi::topology::SimpleCommunicator::world();
                    let mut sum = Vec::new();
                    for (id, mut data) in jobs {
                        let t = std::time::Instant::now();
                        sum.resize(data.len(), 0.0f32);
                        // Non-blocking, polled with short sleeps: a blocking all-reduce
                        // busy-waits for the slowest rank on the core this rank computes on.
                        mpi::request::scope(|scope| {
                            let mut req = world.immediate_all_reduce_into(
                                scope,
                                &data[..],
                                &mut sum[..],
                                SystemOperation::sum(),
                            );
                            loop {
                                match req.test() {
                                    Ok(_) => break,
                                    Err(pending) => req = pending,
                                }
                                std::thread::sleep(std::time::Duration::from_micros(200));
                            }
                        });
                        std::mem::swap(&mut data, &mut sum);
                        if done.send((id, data, t.elapsed().as_secs_f64())).is_err() {
                            return;
                        }
                    }
                })
                .expect("cannot start the reduction thread");
            return Some(CommThread {
                tx: Some(tx),
                rx,
                thread: Some(thread),
            });
        }
        None
    }
}

/// A panic on one rank would leave the others in a collective: print it, then MPI_Abort.
#[cfg(feature = "mpi")]
fn install_abort_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default(info);
        use mpi::topology::Communicator;
        mpi::topology::SimpleCommunicator::world().abort(101);
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> LauncherEnv {
        envy::from_iter(pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap()
    }

    #[test]
    fn a_plain_process_is_not_launched() {
        assert!(!env(&[]).launched());
        // Inside a batch script but not started by srun: job variables only.
        let e = env(&[("SLURM_JOB_ID", "7"), ("SLURM_STEP_NUM_TASKS", "1")]);
        assert!(!e.launched());
    }

    #[test]
    fn launcher_sizes() {
        assert_eq!(env(&[("OMPI_COMM_WORLD_SIZE", "4")]).size(), Some(4));
        assert_eq!(env(&[("PMI_SIZE", "3")]).size(), Some(3));
        let srun = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_NUM_TASKS", "2"),
        ]);
        assert_eq!(srun.size(), Some(2));
        // mpirun inside an sbatch step: OpenMPI's variable wins over the step's.
        let both = env(&[
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("SLURM_PROCID", "0"),
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_NUM_TASKS", "1"),
        ]);
        assert_eq!(both.size(), Some(2));
        assert!(env(&[("PMIX_RANK", "0")]).launched());
        // Empty values are unset, not a parse error.
        assert_eq!(env(&[("OMPI_COMM_WORLD_SIZE", "")]).size(), None);
    }

    #[test]
    fn slurm_description_and_threads() {
        let s: SlurmEnv = envy::from_iter([
            ("SLURM_JOB_ID".to_string(), "42".to_string()),
            ("SLURM_ARRAY_JOB_ID".to_string(), "40".to_string()),
            ("SLURM_ARRAY_TASK_ID".to_string(), "2".to_string()),
            ("SLURM_RESTART_COUNT".to_string(), "1".to_string()),
            ("SLURM_CPUS_PER_TASK".to_string(), "".to_string()),
        ])
        .unwrap();
        assert_eq!(
            s.describe().unwrap(),
            "Slurm job 42 (array 40_2), restart 1"
        );
        assert_eq!(s.cpus_per_task(), None);
        assert_eq!(SlurmEnv::default().describe(), None);
    }

    #[test]
    fn a_single_world_reduces_to_itself() {
        let w = World::single();
        let mut v = [1.5, -2.0];
        w.all_reduce_f64(&mut v, Op::Sum);
        assert_eq!(v, [1.5, -2.0]);
        let mut out = [0.0f32; 2];
        w.sum_f32(&[3.0, 4.0], &mut out);
        assert_eq!(out, [3.0, 4.0]);
        let mut b = vec![1u8, 2];
        w.broadcast_bytes(&mut b);
        assert_eq!(b, [1, 2]);
        assert_eq!(w.all_gather_bytes(&[7, 8, 9]), vec![vec![7, 8, 9]]);
        assert_eq!(w.node, 0);
    }
}
