//! The storage conformance suite: what every backend must do, written once
//! against the traits and run by each backend's own tests (SQLite in its
//! unit tests, Cassandra against the real server in the README's test
//! command). Each check takes a fresh, empty store.

use std::collections::HashSet;

use crate::*;

pub(crate) fn dead_letter(i: usize) -> DeadLetter {
    DeadLetter {
        id: format!("dl-{i:03}"),
        code: "invalid_json".into(),
        reason: "not JSON".into(),
        payload: "x".repeat(i),
        origin: None,
        event_id: None,
        entity_type: None,
        recorded_at: "2026-01-01T00:00:00Z".into(),
    }
}

pub(crate) fn quarantine(i: usize) -> QuarantineRecord {
    QuarantineRecord {
        key: EntityKey::new(if i % 2 == 0 { "a" } else { "b" }, format!("e-{i}")),
        event_id: format!("ev-{i}"),
        event_position: 1,
        kind: "panic".into(),
        error: "boom".into(),
        plugin: PluginRef {
            name: "p".into(),
            version: "1".into(),
            digest: "d".into(),
        },
        recorded_at: "2026-01-01T00:00:00Z".into(),
    }
}

/// Pages of at most `limit`, each resumed from the last item's cursor,
/// list everything exactly once; the unpaged listings still see it all.
/// A cursor the store did not issue is refused as such.
pub async fn listings_page_through_everything_once(s: &dyn Storage) {
    s.commit(Commit {
        dead_letters: (0..23).map(dead_letter).collect(),
        quarantines: (0..11).map(quarantine).collect(),
        ..Commit::default()
    })
    .await
    .unwrap();
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.dead_letter_page(after.as_deref(), 5).await.unwrap();
        assert!(page.len() <= 5);
        let Some(last) = page.last() else { break };
        after = Some(last.cursor.clone());
        seen.extend(page.into_iter().map(|p| p.item.id));
    }
    let want: Vec<String> = (0..23).map(|i| format!("dl-{i:03}")).collect();
    assert_eq!(seen.len(), want.len(), "each once");
    let distinct: HashSet<&String> = seen.iter().collect();
    assert_eq!(distinct.len(), want.len(), "each once");
    assert_eq!(s.dead_letters(7).await.unwrap().len(), 7);
    assert_eq!(s.dead_letters(1000).await.unwrap().len(), 23);

    let mut keys = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let page = s.quarantine_page(after.as_deref(), 4).await.unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.cursor.clone());
        for p in page {
            assert!(keys.insert(p.item.key), "listed twice");
        }
    }
    assert_eq!(keys.len(), 11);
    assert_eq!(s.quarantined().await.unwrap().len(), 11);

    let e = s.dead_letter_page(Some("not-hex"), 5).await.unwrap_err();
    assert!(matches!(e, StoreError::BadCursor(_)), "{e:#}");
    let e = s
        .quarantine_page(Some(&encode_cursor(&7)), 5)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::BadCursor(_)), "{e:#}");
}
