//! Liveness facts gathered by the consume loop, for `/healthz`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Progress of one partition, for `/healthz`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionHealth {
    /// Records or bytes behind.
    pub lag: i64,
    /// Seconds since the last committed batch (or since start).
    pub idle_seconds: f64,
    /// Lag and no progress for longer than the stall limit.
    pub stalled: bool,
}

/// Liveness facts gathered by the consume loop.
pub struct Health {
    started: Instant,
    stall_after: Duration,
    partitions: Mutex<HashMap<(String, i32), (i64, Instant)>>,
    loop_beat: Mutex<Instant>,
    /// Faults being waited out, by where they are (`source`, `store`,
    /// `disk`): each makes `/healthz` answer 503 with its reason until the
    /// loop gets past it.
    faults: Mutex<std::collections::BTreeMap<&'static str, (String, Instant)>>,
}

impl Health {
    /// Liveness with a partition stalled after `stall_after` without progress.
    pub fn new(stall_after: Duration) -> Self {
        Health {
            started: Instant::now(),
            stall_after,
            partitions: Mutex::new(HashMap::new()),
            loop_beat: Mutex::new(Instant::now()),
            faults: Mutex::new(Default::default()),
        }
    }

    /// A fault at `site` is being waited out.
    pub fn fault(&self, site: &'static str, reason: impl Into<String>) {
        let mut f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        let reason = reason.into();
        match f.get_mut(site) {
            Some(have) => have.0 = reason,
            None => {
                f.insert(site, (reason, Instant::now()));
            }
        }
    }

    /// The fault at `site` is over.
    pub fn clear(&self, site: &'static str) {
        self.faults
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(site);
    }

    pub fn lag(&self, source: &str, partition: i32, lag: i64) {
        let mut p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let e = p
            .entry((source.to_string(), partition))
            .or_insert((lag, Instant::now()));
        e.0 = lag;
    }

    /// A batch of the partition was committed. Only a partition the
    /// source reports (its lag comes first) is tracked: a batch of a
    /// partition revoked meanwhile commits late and must not bring it back.
    pub fn progressed(&self, source: &str, partition: i32) {
        let mut p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = p.get_mut(&(source.to_string(), partition)) {
            e.1 = Instant::now();
        }
    }

    /// This host no longer reads these partitions (revoked in a
    /// rebalance): they leave the report. Kept, a partition revoked with
    /// lag would look stalled here for good while another host reads it.
    pub fn forget(&self, partitions: &[(String, i32)]) {
        let mut p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        for k in partitions {
            p.remove(k);
        }
    }

    pub fn beat(&self) {
        *self.loop_beat.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
    }

    /// `(healthy, per-partition details)`. A partition is stalled when it has
    /// lag and made no progress within the stall limit; the loop itself is
    /// stalled when it has not come around for that long.
    pub fn report(&self) -> (bool, serde_json::Value) {
        let p = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let mut parts = serde_json::Map::new();
        let mut healthy = true;
        for ((source, partition), (lag, at)) in p.iter() {
            let idle = at.elapsed();
            let stalled = *lag > 0 && idle > self.stall_after;
            healthy &= !stalled;
            parts.insert(
                format!("{source}#{partition}"),
                serde_json::to_value(PartitionHealth {
                    lag: *lag,
                    idle_seconds: idle.as_secs_f64(),
                    stalled,
                })
                .unwrap_or_default(),
            );
        }
        let beat = self
            .loop_beat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed();
        let loop_alive = beat <= self.stall_after.max(Duration::from_secs(5)) * 2;
        healthy &= loop_alive;
        let faults = self.faults.lock().unwrap_or_else(|e| e.into_inner());
        healthy &= faults.is_empty();
        let faults: serde_json::Map<String, serde_json::Value> = faults
            .iter()
            .map(|(site, (reason, since))| {
                (
                    site.to_string(),
                    serde_json::json!({"reason": reason, "seconds": since.elapsed().as_secs_f64()}),
                )
            })
            .collect();
        let reason = faults
            .values()
            .filter_map(|f| f["reason"].as_str())
            .collect::<Vec<_>>()
            .join("; ");
        (
            healthy,
            serde_json::json!({
                "status": if healthy { "ok" } else { "unhealthy" },
                "reason": if reason.is_empty() { serde_json::Value::Null } else { reason.into() },
                "faults": faults,
                "uptime_seconds": self.started.elapsed().as_secs_f64(),
                "loop_idle_seconds": beat.as_secs_f64(),
                "partitions": parts,
            }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_partition_no_longer_counts_as_stalled() {
        let h = Health::new(Duration::ZERO);
        h.lag("orders", 3, 40);
        h.lag("orders", 4, 0);
        std::thread::sleep(Duration::from_millis(5));
        let (ok, report) = h.report();
        assert!(!ok, "{report}");
        assert_eq!(report["partitions"]["orders#3"]["stalled"], true);
        h.forget(&[("orders".to_string(), 3)]);
        // Its last batch commits after the revocation.
        h.progressed("orders", 3);
        let (ok, report) = h.report();
        assert!(ok, "{report}");
        assert!(report["partitions"].get("orders#3").is_none());
        assert_eq!(report["partitions"]["orders#4"]["stalled"], false);
    }
}
