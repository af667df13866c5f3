//! Data-parallel training's one seam: the [`Communicator`] the trainer reduces gradients
//! through, and how a process finds out which one it has.
//!
//! Three implementations: [`Single`] (one process, today's behaviour, no dependency), `Mpi`
//! (feature `mpi`: rsmpi over the system's Open MPI or MPICH, ranks started by `mpirun`) and
//! `Nccl` (feature `nccl`: NCCL through cudarc for the reductions, one process per GPU, MPI
//! for the start-up exchange and the rest). The trainer's code path is the same for every
//! implementation: only what moves the bytes differs.
//!
//! Failure: a collective that does not complete within [`timeout`] (a rank died or hangs)
//! ends the whole job with an error naming the collective and this rank; a rank that fails
//! on its own ends the job through [`Communicator::abort`] rather than by finalising while
//! the others wait for it. When a rank is killed, `mpirun` itself ends the job and names it.

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The launcher started several ranks, but this build cannot talk to them.
    #[error(
        "{launcher} started {size} ranks, but this bidora was built without the `{feature}` \
         feature: rebuild with `cargo build --release --features {feature}` (each rank would \
         otherwise train alone and write the same run folder)"
    )]
    NotBuilt {
        launcher: String,
        size: usize,
        feature: &'static str,
    },
    #[error("--distributed {0} needs a bidora built with `--features {0}`")]
    FeatureMissing(&'static str),
    #[error("--distributed {0}: the MPI library is already initialised in this process")]
    AlreadyInitialised(&'static str),
    #[error("{0}")]
    Setup(String),
    /// A collective failed on this rank (NCCL reports errors; MPI's default handler ends
    /// the job itself).
    #[error("rank {rank}: {op} failed: {message}")]
    Collective {
        rank: usize,
        op: &'static str,
        message: String,
    },
    /// The ranks disagree about something they must share (a buffer's length, a digest).
    #[error("rank {rank}: {message}")]
    Mismatch { rank: usize, message: String },
}

/// What the trainer needs from the other ranks. Every rank calls the same collectives in the
/// same order with buffers of the same length; the trainer guarantees that by construction.
pub trait Communicator {
    /// This process's rank, 0-based; rank 0 writes the run folder.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// One line for the start of a run (`mpi: rank 0 of 2, Open MPI v4.1.4`).
    fn describe(&self) -> String;
    /// Element-wise sum over the ranks, in place; every rank ends with the same values.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// Rank 0's bytes to every rank (`buf` is replaced on the others, whatever its length).
    fn broadcast(&self, buf: &mut Vec<u8>) -> Result<(), CommError>;
    fn barrier(&self) -> Result<(), CommError>;
    /// Ends every rank of the job with `code`. A failing rank must not return and finalise
    /// while the others wait in a collective for it: that would hang them.
    fn abort(&self, code: i32) -> !;

    /// The mean over the ranks, in place.
    fn all_reduce_mean(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.all_reduce_sum(buf)?;
        let n = self.size() as f32;
        buf.iter_mut().for_each(|x| *x /= n);
        Ok(())
    }
}

/// One process: every collective is the identity.
pub struct Single;

impl Communicator for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn describe(&self) -> String {
        "single process".into()
    }
    fn all_reduce_sum(&self, _: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
    fn broadcast(&self, _: &mut Vec<u8>) -> Result<(), CommError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The communicators `bidora train --distributed` offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Mpi,
    Nccl,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Mpi => "mpi",
            Kind::Nccl => "nccl",
        }
    }
}

/// The world a launcher started this process in: (launcher, ranks), from the variables
/// Open MPI's `mpirun` (`OMPI_COMM_WORLD_SIZE`) and MPICH's or Intel MPI's Hydra and Slurm's
/// PMI (`PMI_SIZE`) set in every rank.
pub fn launched() -> Option<(&'static str, usize)> {
    [
        ("Open MPI's mpirun", "OMPI_COMM_WORLD_SIZE"),
        ("a PMI launcher", "PMI_SIZE"),
    ]
    .into_iter()
    .find_map(|(who, var)| {
        let n = std::env::var(var).ok()?.trim().parse::<usize>().ok()?;
        Some((who, n))
    })
}

/// How long a rank waits in one collective before it ends the job:
/// `BIDORA_COLLECTIVE_TIMEOUT` seconds, 300 by default. Ranks are in step except while rank
/// 0 writes a checkpoint, so this only has to cover the slowest such write.
pub fn timeout() -> Duration {
    let secs = std::env::var("BIDORA_COLLECTIVE_TIMEOUT")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(300.0);
    Duration::from_secs_f64(secs)
}

/// The communicator for this process: the one asked for, else MPI when a launcher started
/// several ranks, else [`Single`].
pub fn connect(kind: Option<Kind>) -> Result<Box<dyn Communicator>, CommError> {
    let kind = match (kind, launched()) {
        (Some(k), _) => k,
        (None, Some((_, n))) if n > 1 => Kind::Mpi,
        (None, _) => return Ok(Box::new(Single)),
    };
    match kind {
        Kind::Mpi => {
            #[cfg(feature = "mpi")]
            {
                Ok(Box::new(mpi::Mpi::init()?))
            }
            #[cfg(not(feature = "mpi"))]
            {
                match launched() {
                    Some((launcher, size)) if size > 1 => Err(CommError::NotBuilt {
                        launcher: launcher.into(),
                        size,
                        feature: "mpi",
                    }),
                    _ => Err(CommError::FeatureMissing("mpi")),
                }
            }
        }
        Kind::Nccl => {
            #[cfg(feature = "nccl")]
            {
                Ok(Box::new(nccl::Nccl::init()?))
            }
            #[cfg(not(feature = "nccl"))]
            {
                Err(CommError::FeatureMissing("nccl"))
            }
        }
    }
}

/// Splits `n` items into `parts` contiguous ranges whose sizes differ by at most one (the
/// first `n % parts` one longer): rank `r`'s share of a global batch.
pub fn share(n: usize, parts: usize, r: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    let (q, extra) = (n / parts, n % parts);
    let start = r * q + r.min(extra);
    start..start + q + usize::from(r < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_batch_and_differ_by_at_most_one() {
        for n in 0..20 {
            for parts in 1..6 {
                let ranges: Vec<_> = (0..parts).map(|r| share(n, parts, r)).collect();
                assert_eq!(ranges[0].start, 0);
                assert_eq!(ranges[parts - 1].end, n);
                for w in ranges.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
                let lens: Vec<_> = ranges.iter().map(|r| r.len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn single_is_the_identity() {
        let mut b = vec![1.0f32, 2.0];
        Single.all_reduce_mean(&mut b).unwrap();
        assert_eq!(b, vec![1.0, 2.0]);
        let mut bytes = b"x".to_vec();
        Single.broadcast(&mut bytes).unwrap();
        assert_eq!(bytes, b"x");
    }
}
