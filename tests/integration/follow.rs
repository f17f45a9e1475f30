//! A followed JSONL file through what happens to log files: rotation by
//! rename and create (with lines written to the old file just before),
//! growth of the new file past the old offset, truncation in place, and a
//! rotation while the host is down. Every event reaches the states exactly
//! once and nothing becomes a dead letter.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::{Host, append, ce, embedded_config, root, tempdir};

const ACCOUNTS: usize = 8;

/// Bank events and the states they must fold to.
#[derive(Default)]
struct Bank {
    /// Per account: (balance, deposits).
    expected: BTreeMap<usize, (i64, i64)>,
    next: usize,
}

impl Bank {
    fn opened(&mut self) -> Vec<String> {
        (0..ACCOUNTS)
            .map(|k| {
                self.expected.insert(k, (0, 0));
                ce(
                    &format!("o-{k}"),
                    "account",
                    &format!("r-{k}"),
                    "account.opened",
                    json!({"owner": format!("owner-{k}")}),
                )
            })
            .collect()
    }

    fn deposits(&mut self, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                let i = self.next;
                self.next += 1;
                let (k, amount) = (i % ACCOUNTS, (i % 97 + 1) as i64);
                let e = self.expected.entry(k).or_default();
                e.0 += amount;
                e.1 += 1;
                ce(
                    &format!("d-{i}"),
                    "account",
                    &format!("r-{k}"),
                    "account.deposited",
                    json!({"amount": amount}),
                )
            })
            .collect()
    }

    /// Wait until every account shows exactly the events written so far:
    /// its state, and its position (one per stored event).
    fn arrived(&self, host: &Host, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        for (k, (balance, deposits)) in &self.expected {
            let want = json!({"owner": format!("owner-{k}"), "balance": balance,
                              "transactions": deposits, "open": true});
            let path = format!("/v1/entities/account/r-{k}");
            loop {
                let (c, v) = host.get(&path);
                if c == 200 && v["state"] == want {
                    assert_eq!(v["position"], deposits + 1, "{what}: r-{k} {v}");
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: r-{k} never reached {want}; last {v}; log:\n{}",
                    host.log_text()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn truncate(p: &Path) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(0)
        .unwrap();
}

#[test]
fn a_followed_file_keeps_every_event_through_rotation_truncation_and_restart() {
    let dir = tempdir();
    let events = dir.path().join("events.jsonl");
    let rotated = |n: u32| dir.path().join(format!("events.jsonl.{n}"));
    let mut bank = Bank::default();
    append(&events, &bank.opened());
    append(&events, &bank.deposits(300));
    let cfg = embedded_config(
        dir.path(),
        std::slice::from_ref(&events),
        &[root().join("examples/bank/bank.wasm")],
        "",
    );
    let mut host = Host::start(&cfg, dir.path(), &[]);
    bank.arrived(&host, "before any rotation");

    // logrotate: lines still go to the old file, which is then renamed
    // away; a new, shorter file takes its path.
    append(&events, &bank.deposits(50));
    std::fs::rename(&events, rotated(1)).unwrap();
    append(&events, &bank.deposits(20));
    bank.arrived(&host, "after a rotation");

    // The new file grows past the offset reached in the old one.
    append(&events, &bank.deposits(400));
    bank.arrived(&host, "after the new file grew past the old offset");

    // copytruncate: emptied in place, then written again.
    truncate(&events);
    append(&events, &bank.deposits(10));
    bank.arrived(&host, "after a truncation");
    append(&events, &bank.deposits(300));
    bank.arrived(&host, "after growth past the truncation");

    // Rotated while the host is down: the checkpoint of the old file must
    // not be applied to the new one, which is larger than its offset.
    host.kill();
    std::fs::rename(&events, rotated(2)).unwrap();
    append(&events, &bank.deposits(600));
    let host = Host::start(&cfg, dir.path(), &[]);
    bank.arrived(&host, "after a rotation while down");
    append(&events, &bank.deposits(30));
    bank.arrived(&host, "after the restart");

    let (_, dl) = host.get("/v1/dead-letters");
    assert_eq!(dl["count"], 0, "no line was read from its middle: {dl}");
    let (c, h) = host.get("/healthz");
    assert_eq!(c, 200, "{h}");
}
