//! The recent past of every partition: its lag and committed offset over the
//! last minutes, in fixed steps, so that a reader (the console's charts)
//! sees the trend the moment it looks rather than only from then on.
//!
//! Fed by the same calls as metrics and health; bounded: a fixed number of
//! steps per partition, and a partition nothing has been heard of for a
//! whole window (a rotated file, a revoked Kafka partition) is forgotten.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// One step of one partition.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct Sample {
    /// Start of the step (Unix milliseconds).
    pub at_ms: i64,
    /// Records (Kafka) or bytes (files) behind, last seen in the step.
    pub lag: Option<i64>,
    /// The source offset committed by the step's end (same unit as `lag`).
    pub committed_offset: Option<i64>,
}

/// The steps of one partition, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PartitionTrend {
    /// The source (a topic, or a file with its identity).
    pub source: String,
    /// The partition within it.
    pub partition: i32,
    /// Oldest first, one per step in which anything was heard.
    pub samples: Vec<Sample>,
}

/// Every partition's recent past.
pub struct Trend {
    step: Duration,
    steps: usize,
    partitions: Mutex<BTreeMap<(String, i32), VecDeque<Sample>>>,
}

impl Trend {
    /// `steps` samples of `step` each per partition.
    pub fn new(step: Duration, steps: usize) -> Self {
        Trend {
            step: step.max(Duration::from_millis(1)),
            steps: steps.max(1),
            partitions: Mutex::new(BTreeMap::new()),
        }
    }

    /// The length of one step.
    pub fn step(&self) -> Duration {
        self.step
    }

    /// How far back it reaches.
    pub fn window(&self) -> Duration {
        self.step * self.steps as u32
    }

    /// The partition's lag now.
    pub fn lag(&self, source: &str, partition: i32, lag: i64) {
        self.update(source, partition, now_ms(), true, |s| s.lag = Some(lag));
    }

    /// The partition committed up to `offset`. Only a partition the source
    /// reports (its lag comes first) is kept: a batch of a partition
    /// revoked meanwhile commits late and must not bring it back.
    pub fn progressed(&self, source: &str, partition: i32, offset: i64) {
        self.update(source, partition, now_ms(), false, |s| {
            s.committed_offset = Some(offset)
        });
    }

    /// This host no longer reads these partitions: their past goes too.
    pub fn forget(&self, partitions: &[(String, i32)]) {
        let mut p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        for k in partitions {
            p.remove(k);
        }
    }

    /// Set the current step's sample of a partition; `add`: start
    /// tracking the partition if it is not yet.
    fn update(
        &self,
        source: &str,
        partition: i32,
        now: i64,
        add: bool,
        set: impl FnOnce(&mut Sample),
    ) {
        let step = self.step.as_millis().max(1) as i64;
        let at = now - now.rem_euclid(step);
        let mut p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let samples = match p.get_mut(&(source.to_string(), partition)) {
            Some(s) => s,
            None if !add => return,
            None => {
                // A new partition: forget those silent for a whole window
                // first, so rotated files do not pile up.
                let oldest = at - step * self.steps as i64;
                p.retain(|_, s| s.back().is_some_and(|l| l.at_ms > oldest));
                p.entry((source.to_string(), partition)).or_default()
            }
        };
        match samples.back_mut() {
            Some(last) if last.at_ms >= at => set(last),
            last => {
                // A new step carries the last known values forward, so a
                // step with only a lag still knows the committed offset.
                let mut s = last.copied().unwrap_or(Sample {
                    at_ms: at,
                    lag: None,
                    committed_offset: None,
                });
                s.at_ms = at;
                set(&mut s);
                samples.push_back(s);
                while samples.len() > self.steps {
                    samples.pop_front();
                }
            }
        }
    }

    /// Every partition heard of within the window, by source and partition.
    pub fn snapshot(&self) -> Vec<PartitionTrend> {
        let oldest = now_ms() - self.window().as_millis() as i64;
        let p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        p.iter()
            .filter(|(_, s)| s.back().is_some_and(|l| l.at_ms > oldest))
            .map(|((source, partition), s)| PartitionTrend {
                source: source.clone(),
                partition: *partition,
                samples: s.iter().copied().collect(),
            })
            .collect()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_within_a_step_share_a_sample_and_a_new_step_carries_values_forward() {
        let t = Trend::new(Duration::from_secs(5), 3);
        t.update("f", 0, 10_000, true, |s| s.lag = Some(7));
        t.update("f", 0, 12_000, false, |s| s.committed_offset = Some(100));
        t.update("f", 0, 14_999, true, |s| s.lag = Some(3));
        t.update("f", 0, 15_000, true, |s| s.lag = Some(1));
        let p = t.partitions.lock().unwrap();
        let s: Vec<_> = p[&("f".to_string(), 0)].iter().copied().collect();
        assert_eq!(
            s,
            [
                Sample {
                    at_ms: 10_000,
                    lag: Some(3),
                    committed_offset: Some(100)
                },
                Sample {
                    at_ms: 15_000,
                    lag: Some(1),
                    committed_offset: Some(100)
                },
            ]
        );
    }

    #[test]
    fn a_partition_keeps_at_most_its_steps_and_silent_ones_are_forgotten() {
        let t = Trend::new(Duration::from_secs(1), 3);
        for i in 0..10 {
            t.update("a", 0, i * 1000, true, |s| s.committed_offset = Some(i));
        }
        {
            let p = t.partitions.lock().unwrap();
            let a = &p[&("a".to_string(), 0)];
            assert_eq!(a.len(), 3);
            assert_eq!(a.front().unwrap().committed_offset, Some(7));
        }
        // Far later, a new partition appears: "a" has been silent for more
        // than the window and goes.
        t.update("b", 1, 60_000, true, |s| s.lag = Some(0));
        {
            let p = t.partitions.lock().unwrap();
            assert_eq!(
                p.keys().cloned().collect::<Vec<_>>(),
                [("b".to_string(), 1)]
            );
        }
        // A revoked partition goes, and its late commit does not bring it back.
        t.forget(&[("b".to_string(), 1)]);
        t.update("b", 1, 61_000, false, |s| s.committed_offset = Some(5));
        assert!(t.partitions.lock().unwrap().is_empty());
    }
}
