//! The native side: the SDK's fold path called directly, on a batch already
//! in the form the SDK receives it (`event-batch`), so that only the boundary
//! (the host's encoding and the copies into the guest) is missing.

use refold_sdk::bindings::refold::plugin::types as wit;
use refold_types::StoredEvent;

/// One batch as the SDK's fold takes it.
pub struct Batch(wit::EventBatch);

impl Batch {
    /// Built once, outside the timed loop, with the host's own encoder.
    pub fn new(events: &[StoredEvent]) -> anyhow::Result<Self> {
        let mut host = refold_runtime::batch::empty();
        refold_runtime::batch::encode_into(&mut host, events)?;
        let span = |s: refold_runtime::bindings::Span| wit::Span {
            offset: s.offset,
            len: s.len,
        };
        Ok(Batch(wit::EventBatch {
            bytes: host.bytes,
            events: host
                .events
                .iter()
                .map(|h| wit::EventHeader {
                    id: span(h.id),
                    event_type: span(h.event_type),
                    source: span(h.source),
                    time: h.time.map(span),
                    data: span(h.data),
                    position: h.position,
                })
                .collect(),
        }))
    }
}

/// Fold `batch` onto `state` exactly as the guest does.
pub fn fold(state: &[u8], batch: &Batch) -> anyhow::Result<Vec<u8>> {
    refold_sdk::__private::fold::<bank::Bank>(state, &batch.0.bytes, &batch.0.events)
        .map_err(|e| anyhow::anyhow!("native fold failed: {}", e.message))
}
