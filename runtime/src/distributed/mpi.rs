//! The MPI communicator (rsmpi): ranks started by `mpirun` (Open MPI) or `mpiexec` (MPICH),
//! on one machine or several.
//!
//! Every collective is started non-blocking and polled against a deadline, because a
//! blocking one waits forever for a rank that hangs. MPI offers no way to cancel a started
//! collective (its buffers stay MPI's), so a rank that times out can only end the job:
//! it says why and calls `MPI_Abort`, which makes the launcher stop every rank.

use std::time::{Duration, Instant};

use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::request::{Request, Scope};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::Threading;

use super::{CommError, Communicator};

/// The exit code a rank ends the job with when a collective times out.
const TIMEOUT_EXIT: i32 = 3;

pub struct Mpi {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    library: String,
    /// Finalises MPI when dropped, after every collective: the last field.
    _universe: mpi::environment::Universe,
}

impl Mpi {
    pub fn init() -> Result<Mpi, CommError> {
        // Only the main thread calls MPI (the engines' worker threads never do).
        let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or(CommError::AlreadyInitialised("mpi"))?;
        let world = universe.world();
        let library = mpi::environment::library_version()
            .ok()
            .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
            .unwrap_or_else(|| "MPI".into());
        Ok(Mpi {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            timeout: super::timeout(),
            library,
            _universe: universe,
        })
    }

    /// Polls `req` until it completes; past the deadline, ends the job.
    fn finish<'a, D: ?Sized, S: Scope<'a>>(&self, mut req: Request<'a, D, S>, op: &str) {
        let start = Instant::now();
        let mut polls = 0u32;
        loop {
            match req.test() {
                Ok(_) => return,
                Err(r) => req = r,
            }
            polls += 1;
            if start.elapsed() > self.timeout {
                eprintln!(
                    "error: rank {} of {}: {op} did not complete within {:.0} s: another rank \
                     died or hangs (its own error, or the launcher's message, names it); ending \
                     the job (BIDORA_COLLECTIVE_TIMEOUT sets the limit)",
                    self.rank,
                    self.size,
                    self.timeout.as_secs_f64()
                );
                self.world.abort(TIMEOUT_EXIT);
            }
            // Spin briefly (ranks are usually in step), then yield the core to the engine
            // threads of a rank that is still computing.
            if polls > 1000 {
                std::thread::sleep(Duration::from_micros(200));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn describe(&self) -> String {
        format!("mpi: rank {} of {}, {}", self.rank, self.size, self.library)
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let send = buf.to_vec();
        mpi::request::scope(|scope| {
            let req = self.world.immediate_all_reduce_into(
                scope,
                &send[..],
                &mut buf[..],
                SystemOperation::sum(),
            );
            self.finish(req, "all-reduce");
        });
        Ok(())
    }

    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<(), CommError> {
        let root = self.world.process_at_rank(0);
        let mut len = buf.len() as u64;
        mpi::request::scope(|scope| {
            let req = root.immediate_broadcast_into(scope, &mut len);
            self.finish(req, "broadcast (length)");
        });
        let len = usize::try_from(len).map_err(|_| CommError::Mismatch {
            rank: self.rank,
            message: format!("rank 0 broadcasts {len} bytes, more than this machine addresses"),
        })?;
        buf.resize(len, 0);
        mpi::request::scope(|scope| {
            let req = root.immediate_broadcast_into(scope, &mut buf[..]);
            self.finish(req, "broadcast");
        });
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let req = self.world.immediate_barrier();
        self.finish(req, "barrier");
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
