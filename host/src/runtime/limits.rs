//! Per-plugin sandbox limits and the `ResourceLimiter` that enforces memory.

use serde::{Deserialize, Serialize};

/// Limits applied to every call into one plugin. Safe defaults; each is a
/// named config key so an operator can widen one without touching the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory a plugin instance may grow to, in bytes.
    pub memory_bytes: u64,
    /// Wall-clock CPU budget of one guest call, in milliseconds (epoch deadline).
    pub cpu_ms: u64,
    /// Largest state a fold may return, in bytes.
    pub max_state_bytes: u64,
    /// Largest total output of one `project` call, in bytes.
    pub max_projection_bytes: u64,
    /// Largest event `data` the host accepts for this plugin, in bytes.
    pub max_event_bytes: u64,
    /// Guest stdout+stderr kept per instance, in bytes; beyond it writes fail.
    pub max_log_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            cpu_ms: 1_000,
            max_state_bytes: 1 << 20,
            max_projection_bytes: 4 << 20,
            max_event_bytes: 256 << 10,
            max_log_bytes: 64 << 10,
        }
    }
}

/// Enforces the memory limit and remembers why a grow was refused, so that the
/// trap that follows can be reported as "memory limit exceeded" instead of a
/// bare `unreachable` from the guest's allocator.
#[derive(Debug)]
pub struct MemoryLimiter {
    max_memory: usize,
    /// Set when a grow was refused: (requested bytes, limit).
    pub exceeded: Option<(usize, usize)>,
    /// High-water mark of linear memory, for metrics.
    pub peak: usize,
}

impl MemoryLimiter {
    /// A limiter allowing `max_memory` bytes of linear memory.
    pub fn new(max_memory: u64) -> Self {
        MemoryLimiter {
            max_memory: usize::try_from(max_memory).unwrap_or(usize::MAX),
            exceeded: None,
            peak: 0,
        }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.exceeded = Some((desired, self.max_memory));
            // Refuse the grow; the guest sees memory.grow return -1 and
            // usually aborts, which we then classify using `exceeded`.
            return Ok(false);
        }
        self.peak = self.peak.max(desired);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold function references; 100k entries is far beyond any
        // real plugin and keeps a hostile guest from exhausting host memory.
        Ok(desired <= 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    #[test]
    fn refuses_growth_past_the_limit_and_records_it() {
        let mut l = MemoryLimiter::new(1 << 20);
        assert!(l.memory_growing(0, 1 << 19, None).unwrap());
        assert!(!l.memory_growing(1 << 19, 2 << 20, None).unwrap());
        assert_eq!(l.exceeded, Some((2 << 20, 1 << 20)));
        assert_eq!(l.peak, 1 << 19);
    }
}
