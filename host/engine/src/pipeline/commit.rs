//! Step 5 of a batch: collect what folding did into the batch's one
//! [`Commit`] and its report, counting it in the metrics.

use refold_store::Commit;

use super::BatchReport;
use super::entity::Done;
use crate::metrics::Metrics;

/// Add each folded entity's update, read-model writes and quarantine to
/// `commit`, and what it applied, held or quarantined to `report`.
pub(crate) fn collect(
    done: Vec<Done>,
    commit: &mut Commit,
    report: &mut BatchReport,
    metrics: &Metrics,
) {
    for mut d in done {
        let tag = (
            d.plugin.info.entity_type.as_str(),
            d.plugin.info.version.as_str(),
        );
        if let Some(o) = &mut d.outcome {
            report.applied += o.applied;
            metrics.applied(tag.0, tag.1, o.applied as u64);
            commit.projections.append(&mut o.projections);
        }
        if d.outcome.is_none() && d.failed_event.is_none() {
            report.held += (d.update.head - d.update.expected_head) as usize;
        }
        if let Some((ev, err)) = &d.failed_event {
            metrics.quarantined(tag.0, tag.1);
            tracing::warn!(entity = %d.update.key, event = %ev.id, error = %err, "entity quarantined");
            report.quarantined.push(d.update.key.clone());
        }
        if let Some(q) = d.quarantine() {
            commit.quarantines.push(q);
        }
        if let Some(c) = d.change.take() {
            commit.changes.push(c);
        }
        commit.entities.push(d.update);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::pipeline::entity::{ChangeDetail, Work, fold_one};
    use crate::pipeline::testing::bank_host;
    use refold_store::{EntityRecord, StoredEvent};
    use refold_types::RawJson;
    use refold_types::event::EntityKey;

    fn event(key: &EntityKey, position: u64, event_type: &str, data: &str) -> StoredEvent {
        StoredEvent {
            key: key.clone(),
            position,
            id: format!("e{position}"),
            source: "/t".into(),
            event_type: event_type.into(),
            time: None,
            data: RawJson::parse(data).unwrap(),
            origin: None,
            record: None,
            digest: None,
        }
    }

    #[test]
    fn applied_held_and_quarantined_entities_are_counted_and_written() {
        let host = bank_host();
        let plugins = host.registry.snapshot();
        let (a, b, c) = (
            EntityKey::new("account", "a"),
            EntityKey::new("account", "b"),
            EntityKey::new("account", "c"),
        );
        let mut boxes = HashMap::new();
        let mut fold = |record: EntityRecord, events| {
            fold_one(
                &mut boxes,
                &plugins,
                Work {
                    record,
                    gap: Vec::new(),
                    events,
                    reported: 0,
                },
                ChangeDetail {
                    emit: true,
                    previous: true,
                    event_ids: true,
                },
            )
        };
        let done = vec![
            fold(
                EntityRecord::new(a.clone()),
                vec![event(&a, 1, "account.opened", r#"{"owner":"o"}"#)],
            ),
            fold(
                EntityRecord {
                    quarantined: true,
                    head: 1,
                    ..EntityRecord::new(b.clone())
                },
                vec![
                    event(&b, 2, "account.deposited", r#"{"amount":1}"#),
                    event(&b, 3, "account.deposited", r#"{"amount":1}"#),
                ],
            ),
            fold(
                EntityRecord::new(c.clone()),
                vec![event(&c, 1, "account.deposited", r#"{"amount":"lots"}"#)],
            ),
        ];
        let (mut commit, mut report) = (Commit::default(), BatchReport::default());
        collect(done, &mut commit, &mut report, &Metrics::new());
        assert_eq!((report.applied, report.held), (1, 2));
        assert_eq!(report.quarantined, vec![c.clone()]);
        assert_eq!(commit.entities.len(), 3);
        assert_eq!(commit.quarantines.len(), 1);
        assert_eq!(commit.quarantines[0].key, c);
        assert_eq!(commit.quarantines[0].kind, "plugin_error");
        assert_eq!(commit.projections.len(), 1);
        // One change record: the entity whose position advanced; the held
        // and the quarantined ones advanced nothing.
        assert_eq!(commit.changes.len(), 1);
        let ch = &commit.changes[0];
        assert_eq!(ch.key, a);
        assert_eq!((ch.first_position, ch.last_position), (1, 1));
        assert_eq!(ch.previous, Some(serde_json::Value::Null));
        assert_eq!(ch.event_ids.as_deref(), Some(&["e1".to_string()][..]));
        assert_eq!(ch.state, commit.entities[0].state);
    }
}
