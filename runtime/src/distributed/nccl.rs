//! The NCCL communicator (cudarc): one process per GPU, started by `mpirun` like the MPI
//! ranks. MPI starts the job, carries NCCL's unique id from rank 0 to the others and does
//! the broadcasts and barriers; NCCL does the all-reduce, the one collective on the step's
//! path.
//!
//! Not yet run on a GPU (none has been available): it is built in CI, and the trainer's code
//! path is the one the MPI ranks test. The buffers are host memory, copied to the device for
//! the reduction and back, because the trainer reduces host gradients (distributed runs are
//! not resident yet). A peer that dies mid-reduction is noticed by `mpirun`, which ends the
//! job; NCCL's own wait has no deadline here.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::mpi::Mpi;
use super::{CommError, Communicator};

pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    device: usize,
    /// Start-up exchange, broadcasts, barriers and abort; dropped last (MPI_Finalize).
    mpi: Mpi,
}

/// The GPU a rank binds: its rank among the ranks of its machine, as the launcher reports it
/// (Open MPI, MPICH), modulo the GPUs visible.
fn local_rank(rank: usize) -> usize {
    [
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "MPI_LOCALRANKID",
        "SLURM_LOCALID",
    ]
    .iter()
    .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
    .unwrap_or(rank)
}

impl Nccl {
    pub fn init() -> Result<Nccl, CommError> {
        let mpi = Mpi::init()?;
        let setup = |what: &str, e: &dyn std::fmt::Debug| {
            CommError::Setup(format!("rank {}: nccl: {what}: {e:?}", mpi.rank()))
        };
        let count = CudaContext::device_count()
            .map_err(|e| setup("no CUDA driver (is this a GPU machine?)", &e))?;
        if count < 1 {
            return Err(CommError::Setup(format!(
                "rank {}: nccl: no GPU is visible",
                mpi.rank()
            )));
        }
        let device = local_rank(mpi.rank()) % count as usize;
        let ctx = CudaContext::new(device).map_err(|e| setup("opening the GPU", &e))?;
        let stream = ctx.default_stream();
        // Rank 0 makes the id; MPI carries its 128 bytes to every rank.
        let mut id_bytes = if mpi.rank() == 0 {
            let id = Id::new().map_err(|e| setup("ncclGetUniqueId", &e))?;
            id.internal().iter().map(|&c| c as u8).collect()
        } else {
            vec![]
        };
        mpi.broadcast(&mut id_bytes)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id_bytes.len() != internal.len() {
            return Err(CommError::Mismatch {
                rank: mpi.rank(),
                message: format!(
                    "NCCL's unique id arrived as {} bytes, not {}",
                    id_bytes.len(),
                    internal.len()
                ),
            });
        }
        for (d, s) in internal.iter_mut().zip(&id_bytes) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(stream.clone(), mpi.rank(), mpi.size(), Id::uninit(internal))
            .map_err(|e| setup("ncclCommInitRank", &e))?;
        Ok(Nccl {
            comm,
            stream,
            device,
            mpi,
        })
    }

    fn failed(&self, op: &'static str, e: &dyn std::fmt::Debug) -> CommError {
        CommError::Collective {
            rank: self.mpi.rank(),
            op,
            message: format!("{e:?}"),
        }
    }
}

impl Communicator for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }

    fn size(&self) -> usize {
        self.mpi.size()
    }

    fn describe(&self) -> String {
        format!(
            "nccl: rank {} of {} on GPU {} (start-up over {})",
            self.rank(),
            self.size(),
            self.device,
            self.mpi.describe()
        )
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if buf.is_empty() {
            return Ok(());
        }
        let mut dev = self
            .stream
            .clone_htod(&*buf)
            .map_err(|e| self.failed("all-reduce (upload)", &e))?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| self.failed("all-reduce", &e))?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| self.failed("all-reduce (download)", &e))?;
        self.stream
            .synchronize()
            .map_err(|e| self.failed("all-reduce (synchronise)", &e))
    }

    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<(), CommError> {
        self.mpi.broadcast(buf)
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.mpi.barrier()
    }

    fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }
}
