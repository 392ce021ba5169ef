//! The undo journal of a sandbox creation. Every host side effect of
//! RunPodSandbox (a dir, the network namespace, a CNI attachment, a
//! process, cgroups, the share's mounts) is pushed here as it happens, and
//! the journal is written through to the sandbox's CREATING record on each
//! push. So whatever ends the creation early (an error, the kubelet's
//! deadline, a daemon crash), the steps that undo it are on disk: the
//! creating task runs them, or the reaper does for a daemon that died.
//!
//! A step that fails is kept: the sandbox becomes UNKNOWN (listed, NOTREADY,
//! removable) with the steps still to do, and the reaper retries them.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::network::cni::Attachment;
use crate::process::Proc;

/// One undo step of a half-made sandbox.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "undo", rename_all = "snake_case")]
pub enum Step {
    /// A dir the creation made (never followed through a mount under it).
    RemoveDir { path: PathBuf },
    /// The pod's network namespace bind mount.
    RemoveNetns { path: PathBuf },
    /// A process the creation started.
    End { process: Proc },
    /// Kill what runs in a pod's cgroups and remove them.
    RemoveCgroups { parent: String },
    /// The VM share's mounts under this sandbox dir.
    TearDownShare { dir: PathBuf },
    /// CNI DEL with these plugin dirs.
    CniDel {
        bins: Vec<PathBuf>,
        attachment: Box<Attachment>,
    },
}

impl Step {
    async fn run(&self) -> Result<(), String> {
        match self {
            Step::RemoveDir { path } => super::shared_fs::remove_sandbox_dir(path)
                .map_err(|e| format!("removing {}: {}", path.display(), crate::error_chain(&e))),
            Step::RemoveNetns { path } => {
                crate::network::netns::remove_netns(path);
                Ok(())
            }
            Step::End { process } => {
                process.end(Duration::ZERO).await;
                if process.alive() {
                    return Err(format!("process {} does not end", process.pid));
                }
                Ok(())
            }
            Step::RemoveCgroups { parent } => {
                if super::cgroups::remove_cgroups(parent).await {
                    Ok(())
                } else {
                    Err(format!("cgroups under {parent} are left"))
                }
            }
            Step::TearDownShare { dir } => super::shared_fs::Share::new(dir)
                .teardown()
                .map_err(|e| format!("the share of {}: {}", dir.display(), crate::error_chain(&e))),
            Step::CniDel { bins, attachment } => crate::network::cni::del(bins, attachment)
                .await
                .map_err(|e| format!("CNI DEL: {}", crate::error_chain(&e))),
        }
    }
}

/// Where the journal is written through: called with all steps after each
/// push.
pub type Journal = Box<dyn FnMut(&[Step]) + Send>;

/// Undo steps, run in reverse.
#[derive(Default)]
pub struct Rollback {
    steps: Vec<Step>,
    journal: Option<Journal>,
}

impl std::fmt::Debug for Rollback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rollback")
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Rollback {
    /// Steps to do (a journal read back from a record).
    pub fn from_steps(steps: Vec<Step>) -> Rollback {
        Rollback {
            steps,
            journal: None,
        }
    }

    /// From now on, every push writes all steps through `journal`.
    pub fn journal_to(&mut self, journal: Journal) {
        self.journal = Some(journal);
    }

    pub fn push(&mut self, step: Step) {
        self.steps.push(step);
        if let Some(journal) = &mut self.journal {
            journal(&self.steps);
        }
    }

    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Forgets the steps: the sandbox exists, its stop and remove undo it.
    pub fn commit(mut self) {
        self.steps.clear();
    }

    /// Runs every step, newest first. Returns the steps still to do: empty
    /// when all went well; otherwise the failed ones plus the dir removals
    /// (kept so the record, which lives in the sandbox dir, survives to
    /// retry them), oldest first.
    pub async fn run(self) -> Vec<Step> {
        let mut failed = Vec::new();
        let mut dirs = Vec::new();
        for step in self.steps.into_iter().rev() {
            if matches!(step, Step::RemoveDir { .. }) && !failed.is_empty() {
                dirs.push(step);
                continue;
            }
            tracing::debug!(?step, "undoing");
            if let Err(why) = step.run().await {
                tracing::warn!(%why, "an undo step failed; it stays journaled");
                failed.push(step);
            }
        }
        if failed.is_empty() {
            return Vec::new();
        }
        failed.extend(dirs);
        failed.reverse();
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_round_trip_through_json() {
        let steps = vec![
            Step::RemoveDir {
                path: "/s/a".into(),
            },
            Step::End {
                process: Proc { pid: 7, start: 42 },
            },
            Step::RemoveCgroups {
                parent: "/vmpod/a".into(),
            },
        ];
        let json = serde_json::to_string(&steps).unwrap();
        assert!(json.contains(r#""undo":"end""#), "{json}");
        let back: Vec<Step> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, steps);
    }

    #[tokio::test]
    async fn every_push_is_journaled_and_a_failed_step_is_kept_with_the_dirs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("sandbox");
        std::fs::create_dir(&dir).unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(0usize));
        let mut undo = Rollback::default();
        let counter = seen.clone();
        undo.journal_to(Box::new(move |steps| {
            *counter.lock().unwrap() = steps.len()
        }));
        undo.push(Step::RemoveDir { path: dir.clone() });
        // A file where a share's dir should be: its teardown fails.
        let bogus = tmp.path().join("file");
        std::fs::write(&bogus, b"x").unwrap();
        undo.push(Step::TearDownShare { dir: bogus.clone() });
        assert_eq!(*seen.lock().unwrap(), 2);
        let left = undo.run().await;
        assert_eq!(
            left,
            vec![
                Step::RemoveDir { path: dir.clone() },
                Step::TearDownShare { dir: bogus }
            ]
        );
        assert!(dir.exists(), "the record's dir must outlive a failed step");
        // Nothing failing: everything is done.
        let left = Rollback::from_steps(left[..1].to_vec()).run().await;
        assert!(left.is_empty());
        assert!(!dir.exists());
    }
}
