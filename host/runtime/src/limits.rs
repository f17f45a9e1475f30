//! Per-plugin sandbox limits and the `ResourceLimiter` that enforces memory
//! and tables for a whole store.

use serde::{Deserialize, Serialize};

/// Limits applied to every call into one plugin. Safe defaults; each is a
/// named config key so an operator can widen one without touching the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory a plugin instance may grow to, in bytes: the sum over
    /// every linear memory of the instance (a component may define several).
    pub memory_bytes: u64,
    /// Wall-clock CPU budget of one guest call, in milliseconds (epoch deadline).
    pub cpu_ms: u64,
    /// Largest state a fold may return, in bytes.
    pub max_state_bytes: u64,
    /// Largest total output of one `project` call, in bytes, counted as the
    /// host holds it: names, keys and bodies plus a fixed cost per op.
    pub max_projection_bytes: u64,
    /// Most operations one `project` call may return.
    pub max_projection_ops: u64,
    /// Largest event `data` the host accepts for this plugin, in bytes.
    pub max_event_bytes: u64,
    /// Guest stdout+stderr kept per instance, in bytes; beyond it writes fail.
    pub max_log_bytes: u64,
    /// Log lines (the `log` import and stdout/stderr lines) forwarded per
    /// call; the rest are dropped and counted.
    pub max_log_lines_per_call: u64,
    /// Log bytes forwarded per call; the rest are dropped and counted.
    pub max_log_bytes_per_call: u64,
    /// Table elements an instance may hold, summed over all its tables.
    pub max_table_elements: u64,
    /// Linear memories an instance may define.
    pub max_memories: u64,
    /// Tables an instance may define.
    pub max_tables: u64,
    /// Core instances a component may create (a component is several).
    pub max_instances: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: 64 << 20,
            cpu_ms: 1_000,
            max_state_bytes: 1 << 20,
            max_projection_bytes: 4 << 20,
            max_projection_ops: 10_000,
            max_event_bytes: 256 << 10,
            max_log_bytes: 64 << 10,
            max_log_lines_per_call: 100,
            max_log_bytes_per_call: 64 << 10,
            max_table_elements: 100_000,
            // A Rust component has one memory and a few tables and core
            // instances (its module plus the shims wit-component adds); these
            // leave room for other toolchains while keeping the sums bounded.
            max_memories: 4,
            max_tables: 32,
            max_instances: 64,
        }
    }
}

/// Enforces the memory and table limits over the whole store and remembers
/// why a grow was refused, so that the trap that follows (or the deadline,
/// when the guest catches the failure and spins) can be reported as "memory
/// limit exceeded" instead of a bare `unreachable` or a timeout.
#[derive(Debug)]
pub struct MemoryLimiter {
    max_memory: usize,
    max_table_elements: usize,
    max_memories: usize,
    max_tables: usize,
    max_instances: usize,
    /// Bytes of linear memory of every memory in the store.
    total_memory: usize,
    /// Elements of every table in the store.
    total_elements: usize,
    /// Set when a grow was refused: (requested total bytes, limit). Cleared
    /// by the sandbox before each call, so it describes that call.
    pub exceeded: Option<(usize, usize)>,
    /// Set when a table grow was refused: (requested total elements, limit),
    /// cleared like `exceeded`.
    pub table_exceeded: Option<(usize, usize)>,
    /// High-water mark of linear memory (all memories), for metrics.
    pub peak: usize,
}

fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

impl MemoryLimiter {
    /// A limiter for a store running under `limits`.
    pub fn new(limits: &Limits) -> Self {
        MemoryLimiter {
            max_memory: to_usize(limits.memory_bytes),
            max_table_elements: to_usize(limits.max_table_elements),
            max_memories: to_usize(limits.max_memories),
            max_tables: to_usize(limits.max_tables),
            max_instances: to_usize(limits.max_instances),
            total_memory: 0,
            total_elements: 0,
            exceeded: None,
            table_exceeded: None,
            peak: 0,
        }
    }

    /// Linear memory of the store now, in bytes.
    pub fn total_memory(&self) -> usize {
        self.total_memory
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Memories are never freed while the store lives, so the store's
        // total is the sum of every grow (and initial size) granted.
        let total = self
            .total_memory
            .saturating_sub(current)
            .saturating_add(desired);
        if total > self.max_memory {
            self.exceeded = Some((total, self.max_memory));
            // Refuse the grow; the guest sees memory.grow return -1 and
            // usually aborts, which we then classify using `exceeded`.
            return Ok(false);
        }
        self.total_memory = total;
        self.peak = self.peak.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables hold references, 8+ bytes of host memory each: bound their
        // sum like memory so many tables cannot add up.
        let total = self
            .total_elements
            .saturating_sub(current)
            .saturating_add(desired);
        if total > self.max_table_elements {
            self.table_exceeded = Some((total, self.max_table_elements));
            return Ok(false);
        }
        self.total_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.max_instances
    }

    fn tables(&self) -> usize {
        self.max_tables
    }

    fn memories(&self) -> usize {
        self.max_memories
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    fn limits(memory: u64) -> Limits {
        Limits {
            memory_bytes: memory,
            ..Limits::default()
        }
    }

    #[test]
    fn refuses_growth_past_the_limit_and_records_it() {
        let mut l = MemoryLimiter::new(&limits(1 << 20));
        assert!(l.memory_growing(0, 1 << 19, None).unwrap());
        assert!(!l.memory_growing(1 << 19, 2 << 20, None).unwrap());
        assert_eq!(l.exceeded, Some((2 << 20, 1 << 20)));
        assert_eq!(l.peak, 1 << 19);
    }

    #[test]
    fn counts_the_sum_of_all_memories() {
        let mut l = MemoryLimiter::new(&limits(1 << 20));
        // Two memories of 512 KiB fit exactly; a third one does not.
        assert!(l.memory_growing(0, 1 << 19, None).unwrap());
        assert!(l.memory_growing(0, 1 << 19, None).unwrap());
        assert!(!l.memory_growing(0, 64 << 10, None).unwrap());
        assert_eq!(l.exceeded, Some(((1 << 20) + (64 << 10), 1 << 20)));
        assert_eq!(l.total_memory(), 1 << 20);
    }

    #[test]
    fn counts_the_sum_of_all_table_elements() {
        let mut l = MemoryLimiter::new(&Limits {
            max_table_elements: 10,
            ..Limits::default()
        });
        assert!(l.table_growing(0, 6, None).unwrap());
        assert!(!l.table_growing(0, 6, None).unwrap());
        assert_eq!(l.table_exceeded, Some((12, 10)));
        assert!(l.table_growing(0, 4, None).unwrap());
    }
}
