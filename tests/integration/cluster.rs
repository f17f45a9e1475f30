//! Cluster mode end to end, against real servers: Kafka at
//! `$REFOLD_TEST_KAFKA` (default 127.0.0.1:9092) and Cassandra at
//! `$REFOLD_TEST_CASSANDRA` (default 127.0.0.1:9042), as started by
//! `deploy/local/up`. A test whose server is unreachable fails, it never
//! skips. Each test has its own topic, consumer group and keyspace, so they
//! can run in parallel; the one that freezes Cassandra runs alone.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{TcpStream, ToSocketAddrs as _};
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use serde_json::{Value, json};

use crate::common::*;
use crate::embedded::generated_bank;

const PARTITIONS: i32 = 4;

/// Tests share the servers; the Cassandra-freezing test takes it exclusively.
static SERVERS: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    SERVERS.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    SERVERS.write().unwrap_or_else(|e| e.into_inner())
}

fn kafka_addr() -> String {
    std::env::var("REFOLD_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn cassandra_addr() -> String {
    std::env::var("REFOLD_TEST_CASSANDRA").unwrap_or_else(|_| "127.0.0.1:9042".into())
}

/// Fail (never skip) with a clear message when a server is not reachable.
fn require_servers() {
    for (name, addr, var) in [
        ("Kafka", kafka_addr(), "REFOLD_TEST_KAFKA"),
        ("Cassandra", cassandra_addr(), "REFOLD_TEST_CASSANDRA"),
    ] {
        let first = addr.split(',').next().unwrap_or_default().to_string();
        let reachable = first
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .map(|sa| TcpStream::connect_timeout(&sa, Duration::from_secs(3)));
        match reachable {
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!(
                "{name} is not reachable at {first} ({e}). The cluster tests need real servers: \
                 start them with deploy/local/up, or point {var} at yours."
            ),
            None => panic!("{name} address {first:?} ({var}) does not resolve"),
        }
    }
}

/// A name unique to this run and test: a topic, group and keyspace.
fn unique(what: &str) -> String {
    format!(
        "it_{what}_{}_{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Create a topic with [`PARTITIONS`] partitions.
fn create_topic(name: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka_addr())
        .create()
        .expect("creating a Kafka admin client");
    let topic = NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1));
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics([&topic], &opts))
        .unwrap_or_else(|e| panic!("creating topic {name} on {}: {e}", kafka_addr()));
    for r in results {
        if let Err((t, e)) = r {
            panic!("creating topic {t}: {e}");
        }
    }
}

/// Delete a topic (best effort).
fn delete_topic(name: &str) {
    let admin: Result<AdminClient<DefaultClientContext>, _> = ClientConfig::new()
        .set("bootstrap.servers", kafka_addr())
        .create();
    if let Ok(admin) = admin {
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        if let Err(e) = futures::executor::block_on(admin.delete_topics(&[name], &opts)) {
            eprintln!("could not delete topic {name}: {e}");
        }
    }
}

/// Drop a keyspace (best effort).
fn drop_keyspace(name: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let r = rt.block_on(async {
        let s = scylla::client::session_builder::SessionBuilder::new()
            .known_node(cassandra_addr())
            .build()
            .await?;
        s.query_unpaged(format!("DROP KEYSPACE IF EXISTS {name}"), ())
            .await?;
        anyhow::Ok(())
    });
    if let Err(e) = r {
        eprintln!("could not drop keyspace {name}: {e}");
    }
}

/// Produce a JSONL file with `refold produce`.
fn produce(dir: &Path, topic: &str, file: &Path, binary: bool) -> Value {
    let brokers = kafka_addr();
    let mut args = vec![
        "produce",
        "--brokers",
        &brokers,
        "--topic",
        topic,
        file.to_str().unwrap(),
    ];
    if binary {
        args.push("--binary");
    }
    let (code, out, err) = refold(&args, dir);
    assert_eq!(
        code, 0,
        "refold produce failed:\nstdout: {out}\nstderr: {err}"
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("refold produce printed {out:?}"))
}

/// One test's names and files.
struct Cluster {
    dir: tempfile::TempDir,
    topic: String,
    group: String,
    keyspace: String,
    /// Whether a config of this cluster publishes change records.
    publishes_changes: std::cell::Cell<bool>,
}

/// A passed test leaves nothing behind; a failed one keeps its topic and
/// keyspace for inspection. Hosts are declared after their `Cluster`, so
/// they are gone by the time it is dropped.
impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "keeping topic and keyspace {} for inspection",
                self.keyspace
            );
            return;
        }
        drop_keyspace(&self.keyspace);
        delete_topic(&self.topic);
        if self.publishes_changes.get() {
            delete_topic(&self.change_topic("account"));
            delete_topic(&format!("{}-changes-cursor", self.topic));
        }
    }
}

impl Cluster {
    fn new(what: &str) -> Cluster {
        require_servers();
        let name = unique(what);
        create_topic(&name);
        Cluster {
            dir: tempdir(),
            topic: name.clone(),
            group: name.clone(),
            keyspace: name,
            publishes_changes: std::cell::Cell::new(false),
        }
    }

    /// The change topic of `entity_type` in a config from
    /// [`Cluster::publish_changes`].
    fn change_topic(&self, entity_type: &str) -> String {
        format!("{}-changes-{entity_type}", self.topic)
    }

    /// Make `cfg` publish change records to Kafka (`[changes.kafka]`).
    fn publish_changes(&self, cfg: &Path) {
        self.publishes_changes.set(true);
        let mut text = std::fs::read_to_string(cfg).unwrap();
        text.push_str(&format!(
            "\n[changes.kafka]\ntopic = \"{t}-changes-{{entity_type}}\"\n\
             cursor_topic = \"{t}-changes-cursor\"\npartitions = 3\nreplication_factor = 1\n",
            t = self.topic
        ));
        std::fs::write(cfg, text).unwrap();
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write a cluster-mode config; `kafka_extra` and `cassandra_extra` are
    /// more keys of those sections.
    fn config(
        &self,
        name: &str,
        batch_size: usize,
        kafka_extra: &str,
        cassandra_extra: &str,
    ) -> PathBuf {
        let q = |p: PathBuf| format!("{:?}", p.display().to_string());
        let cfg = format!(
            "[source]\nkind = \"kafka\"\nbatch_size = {batch_size}\nlinger_ms = 50\n\n\
             [kafka]\nbrokers = {brokers:?}\ntopics = [{topic:?}]\ngroup_id = {group:?}\n{kafka_extra}\n\n\
             [store]\nkind = \"cassandra\"\n\n\
             [cassandra]\nnodes = [{nodes:?}]\nkeyspace = {ks:?}\n{cassandra_extra}\n\n\
             [plugins]\nfiles = [{bank}, {orders}]\n",
            brokers = kafka_addr(),
            topic = self.topic,
            group = self.group,
            nodes = cassandra_addr(),
            ks = self.keyspace,
            bank = q(root().join("examples/bank/bank.wasm")),
            orders = q(root().join("examples/orders/orders.wasm")),
        );
        let p = self.path().join(format!("{name}.toml"));
        std::fs::write(&p, cfg).unwrap();
        p
    }

    fn write_lines(&self, name: &str, lines: &[String]) -> PathBuf {
        let p = self.path().join(name);
        append(&p, lines);
        p
    }
}

/// Wait until every entity has its expected state; returns the last
/// answers, by entity id.
fn wait_for_states(
    host: &Host,
    entity_type: &str,
    expected: &BTreeMap<String, Value>,
    limit: Duration,
) -> HashMap<String, Value> {
    let start = Instant::now();
    let mut got = HashMap::new();
    for (id, want) in expected {
        let path = format!("/v1/entities/{entity_type}/{id}");
        let left = limit
            .saturating_sub(start.elapsed())
            .max(Duration::from_secs(1));
        let mut last = Value::Null;
        let ok = poll(left, || {
            let (c, v) = host.get(&path);
            let done = c == 200 && v["state"] == *want;
            last = v.clone();
            done.then_some(v)
        });
        let v = ok.unwrap_or_else(|| {
            panic!(
                "{path}: expected state {want}, last answer {last} (after {:?})\nhost log tail:\n{}",
                start.elapsed(),
                tail(&host.log_text(), 40)
            )
        });
        got.insert(id.clone(), v);
    }
    got
}

fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `(entity_type, entity_id) -> distinct event ids` of the lines that are
/// events of a known type: what the event store must hold.
fn distinct_events(
    lines: &[String],
    known_types: &[&str],
) -> BTreeMap<(String, String), HashSet<String>> {
    let mut out: BTreeMap<(String, String), HashSet<String>> = BTreeMap::new();
    for l in lines {
        let Ok(v) = serde_json::from_str::<Value>(l) else {
            continue;
        };
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let (Some(id), Some(_), Some(subject), Some(t)) =
            (s("id"), s("type"), s("subject"), s("entitytype"))
        else {
            continue;
        };
        if known_types.contains(&t.as_str()) {
            out.entry((t, subject)).or_default().insert(id);
        }
    }
    out
}

fn expected_states(file: &Path) -> BTreeMap<(String, String), Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                (
                    v["entity_type"].as_str().unwrap().to_string(),
                    v["entity_id"].as_str().unwrap().to_string(),
                ),
                v["state"].clone(),
            )
        })
        .collect()
}

fn read_lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

/// Every generated account at its reference state, each event stored once.
fn check_bank(host: &Host, lines: &[String], expected: &BTreeMap<String, Value>, limit: Duration) {
    let got = wait_for_states(host, "account", expected, limit);
    let distinct = distinct_events(lines, &["account"]);
    for ((_, id), ids) in &distinct {
        let v = &got[id];
        assert_eq!(
            v["head"],
            json!(ids.len()),
            "account {id}: every distinct event stored once: {v}"
        );
        assert_eq!(
            v["position"],
            json!(ids.len()),
            "account {id}: every event applied once: {v}"
        );
        assert_eq!(v["quarantined"], false, "{v}");
    }
}

/// The change topic of the accounts, read as a read_committed consumer
/// (`refold listen --kafka`) once every account's last record is there:
/// exactly one record per position advance (ids unique, each account's
/// records contiguous from position 1, in order), and each account's last
/// record holds the state the host answers.
fn check_change_stream(c: &Cluster, host: &Host, expected: &BTreeMap<String, Value>, order: Order) {
    let states = wait_for_states(host, "account", expected, Duration::from_secs(60));
    // Read until every account's records cover its positions without a
    // gap (a late record may come after later ones, `Order::Position`).
    let records = read_change_topic(c, host, |records| {
        let mut spans: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for r in records {
            if r["type"] == "refold.state.changed" {
                spans
                    .entry(r["subject"].as_str().unwrap_or(""))
                    .or_default()
                    .push((
                        r["firstposition"].as_u64().unwrap_or(0),
                        r["lastposition"].as_u64().unwrap_or(0),
                    ));
            }
        }
        states.iter().all(|(id, v)| {
            let mut s = spans.remove(id.as_str()).unwrap_or_default();
            s.sort();
            let mut next = 1;
            for (first, last) in s {
                if first != next {
                    return false;
                }
                next = last + 1;
            }
            Some(next - 1) == v["position"].as_u64()
        })
    });
    let (changed, corrected) = check_changed_records(&records, &states, order);
    assert_eq!(corrected, 0, "corrections with no change of generation");
    eprintln!(
        "change topic: {changed} records for {} accounts, each advance once",
        states.len()
    );
}

/// The order in which an account's change records must follow each other.
#[derive(Clone, Copy, PartialEq)]
enum Order {
    /// In topic order: records of an account come in position order.
    Topic,
    /// By position only: a batch that waited in doubt (a paused host's,
    /// applied after it woke) is published after the later batches of its
    /// entities (`CASSANDRA.md`, "The change stream of a cluster").
    Position,
}

/// The account records of `c`'s change topic as a `read_committed` reader
/// sees them, read again until `done` holds of them; fails when it never
/// does.
fn read_change_topic(c: &Cluster, host: &Host, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let topic = c.change_topic("account");
    let read = || -> Vec<Value> {
        let (code, out, err) = refold(
            &["listen", "--kafka", &kafka_addr(), "--topic", &topic],
            c.path(),
        );
        // The publisher creates the topic with its first records.
        if code != 0 && err.contains("UNKNOWN_TOPIC") {
            return Vec::new();
        }
        assert_eq!(code, 0, "refold listen --kafka: {err}");
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let mut records = Vec::new();
    let caught_up = poll(Duration::from_secs(90), || {
        records = read();
        done(&records).then_some(())
    });
    assert!(
        caught_up.is_some(),
        "the change topic never caught up with the states ({} records)\nhost log tail:\n{}",
        records.len(),
        tail(&host.log_text(), 40)
    );
    records
}

/// Of `records`: no id twice; each account's `refold.state.changed` records
/// follow each other from position 1, one per position advance, in
/// `order`; and each account's last record (in topic order, changed or
/// corrected; by position, the furthest) holds the state in `states`.
/// Returns how many records were changes and how many corrections.
fn check_changed_records(
    records: &[Value],
    states: &HashMap<String, Value>,
    order: Order,
) -> (usize, usize) {
    let mut by_entity: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    let mut last: HashMap<&str, &Value> = HashMap::new();
    let mut ids = HashSet::new();
    let mut corrected = 0;
    for r in records {
        assert!(
            ids.insert(r["id"].as_str().unwrap().to_string()),
            "a record id published twice: {r}"
        );
        last.insert(r["subject"].as_str().unwrap(), r);
        match r["type"].as_str() {
            Some("refold.state.changed") => by_entity
                .entry(r["subject"].as_str().unwrap().to_string())
                .or_default()
                .push(r),
            Some("refold.state.corrected") => corrected += 1,
            _ => panic!("a record of no known type: {r}"),
        }
    }
    for (id, v) in states {
        let rs = by_entity.get_mut(id).unwrap();
        if order == Order::Position {
            rs.sort_by_key(|r| r["firstposition"].as_u64());
            last.insert(id, *rs.last().unwrap());
        }
        let mut next = 1;
        for r in rs.iter() {
            assert_eq!(
                r["firstposition"], next,
                "account {id}: records must follow each other, one per advance: {rs:?}"
            );
            next = r["lastposition"].as_u64().unwrap() + 1;
        }
        let last = last[id.as_str()];
        assert_eq!(last["lastposition"], v["position"], "{id}: {last}");
        assert_eq!(last["data"]["state"], v["state"], "{id}: {last}");
    }
    (records.len() - corrected, corrected)
}

/// The `refold.state.corrected` records of `records` made by activation
/// `seq`, by account.
fn corrections_of(records: &[Value], seq: &Value) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for r in records {
        if r["type"] == "refold.state.corrected" && r["activation"] == *seq {
            let id = r["subject"].as_str().unwrap().to_string();
            assert!(
                out.insert(id, r.clone()).is_none(),
                "two corrections of one account by one activation: {r}"
            );
        }
    }
    out
}

#[test]
fn kafka_fixtures_fold_to_the_expected_states_in_cassandra() {
    let _g = shared();
    let c = Cluster::new("fixtures");
    let bank = root().join("examples/bank/events.jsonl");
    let orders = root().join("examples/orders/events.jsonl");
    let p1 = produce(c.path(), &c.topic, &bank, false);
    let p2 = produce(c.path(), &c.topic, &orders, true);
    assert_eq!(p1["records"], json!(read_lines(&bank).len()), "{p1}");
    assert_eq!(p2["mode"], "binary", "{p2}");

    let cfg = c.config("host", 16, "", "");
    let host = Host::start(&cfg, c.path(), &[]);
    let mut expected = expected_states(&root().join("examples/bank/expected.jsonl"));
    expected.extend(expected_states(
        &root().join("examples/orders/expected.jsonl"),
    ));
    let mut lines = read_lines(&bank);
    lines.extend(read_lines(&orders));
    let distinct = distinct_events(&lines, &["account", "order"]);
    for ((t, id), want) in &expected {
        let one: BTreeMap<String, Value> = [(id.clone(), want.clone())].into();
        let v = &wait_for_states(&host, t, &one, Duration::from_secs(90))[id];
        let n = distinct
            .get(&(t.clone(), id.clone()))
            .map(HashSet::len)
            .unwrap_or(0);
        // Events that leave the state as it is (an unknown type) may still be
        // on their way when the expected state shows.
        let path = format!("/v1/entities/{t}/{id}");
        let v = &poll(Duration::from_secs(30), || {
            let (_, now) = host.get(&path);
            (now["head"] == json!(n)).then_some(now)
        })
        .unwrap_or_else(|| v.clone());
        assert_eq!(
            v["head"],
            json!(n),
            "{t}/{id}: the raw events are exactly the distinct valid input events: {v}"
        );
    }
    // No entity beyond the expected ones got a state (dead letters added none).
    assert_eq!(
        distinct.len(),
        expected.len(),
        "fixtures: {:?}",
        distinct.keys().collect::<Vec<_>>()
    );

    // One poison event per fixture: quarantined, with its held events stored.
    let (_, q) = host.get("/v1/quarantine");
    let quarantined: HashSet<String> = q["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            i["key"]["entity_id"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(
        quarantined,
        HashSet::from(["acc-5".to_string(), "order-6".to_string()]),
        "{q}"
    );
    let (_, acc5) = host.get("/v1/entities/account/acc-5");
    assert_eq!(acc5["quarantined"], true, "{acc5}");
    assert!(
        acc5["position"].as_u64().unwrap() < acc5["head"].as_u64().unwrap(),
        "held events are stored: {acc5}"
    );

    // The read model, from Cassandra: one balance document per owner.
    for ((t, _), state) in &expected {
        if t == "account" {
            let owner = state["owner"].as_str().unwrap();
            let (code, doc) = host.get(&format!("/v1/projections/balances/{owner}"));
            assert_eq!(code, 200, "balances/{owner}: {doc}");
            assert_eq!(
                doc["document"]["balance"], state["balance"],
                "balances/{owner}: {doc}"
            );
        }
    }
    let (code, _) = host.get("/v1/projections/balances/grace");
    assert_eq!(
        code, 404,
        "grace's document is deleted when acc-7 changes owner"
    );

    // Point in time, folded from the raw events kept in Cassandra.
    let (code, past) = host.get("/v1/entities/account/acc-1?at=1");
    assert_eq!(code, 200, "{past}");
    assert_eq!(past["state"]["balance"], 0, "{past}");

    // Bad lines of both files are dead letters, with their Kafka origin.
    let (_, dl) = host.get("/v1/dead-letters");
    assert!(dl["count"].as_u64().unwrap() >= 10, "{dl}");
    for d in dl["items"].as_array().unwrap() {
        assert_eq!(d["origin"]["source"], json!(c.topic), "{d}");
    }
}

#[test]
fn bad_records_become_dead_letters_with_their_kafka_origin() {
    let _g = shared();
    let c = Cluster::new("deadletters");
    let lines = vec![
        ce("d1", "account", "dl-1", "account.opened", json!({"owner": "ann"})),
        "{this is not json".to_string(),
        json!({"specversion": "1.0", "id": "m1", "type": "account.deposited", "entitytype": "account", "data": {"amount": 5}})
            .to_string(),
        ce("u1", "ledger", "l-1", "ledger.posted", json!({})),
        ce("d2", "account", "dl-1", "account.deposited", json!({"amount": 70})),
    ];
    let file = c.write_lines("bad.jsonl", &lines);
    produce(c.path(), &c.topic, &file, false);
    let host = Host::start(&c.config("host", 100, "", ""), c.path(), &[]);
    let want: BTreeMap<String, Value> = [(
        "dl-1".to_string(),
        json!({"owner": "ann", "balance": 70, "transactions": 1, "open": true}),
    )]
    .into();
    wait_for_states(&host, "account", &want, Duration::from_secs(60));
    let dl = poll(Duration::from_secs(30), || {
        let (_, dl) = host.get("/v1/dead-letters");
        (dl["count"] == 3).then_some(dl)
    })
    .unwrap_or_else(|| {
        panic!(
            "3 dead letters expected: {}",
            host.get("/v1/dead-letters").1
        )
    });
    let items = dl["items"].as_array().unwrap();
    let by_code: HashMap<&str, &Value> = items
        .iter()
        .map(|d| (d["code"].as_str().unwrap(), d))
        .collect();
    for code in ["malformed_json", "missing_attribute", "unknown_entity_type"] {
        let d = by_code
            .get(code)
            .unwrap_or_else(|| panic!("no {code} dead letter: {dl}"));
        assert!(!d["reason"].as_str().unwrap().is_empty(), "{d}");
        let o = &d["origin"];
        assert_eq!(o["source"], json!(c.topic), "{d}");
        let partition = o["partition"].as_i64().unwrap();
        assert!((0..PARTITIONS as i64).contains(&partition), "{d}");
        assert!(o["offset"].as_i64().unwrap() >= 0, "{d}");
    }
    assert!(
        by_code["missing_attribute"]["reason"]
            .as_str()
            .unwrap()
            .contains("subject"),
        "{dl}"
    );
    assert!(
        by_code["malformed_json"]["payload"]
            .as_str()
            .unwrap()
            .contains("this is not json"),
        "{dl}"
    );
    assert_eq!(
        by_code["unknown_entity_type"]["entity_type"], "ledger",
        "{dl}"
    );
}

#[test]
fn sigkill_at_random_points_loses_nothing_and_applies_nothing_twice() {
    let _g = shared();
    let c = Cluster::new("crash");
    let (lines, expected) = generated_bank(20_000, 150, 11);
    let file = c.write_lines("events.jsonl", &lines);
    produce(c.path(), &c.topic, &file, false);
    let cfg = restarting_member(&c, "crash-host", 100);
    let mut rng = 0x5eed_u64;
    let mut committed_before_kills = 0;
    for round in 0..4 {
        let mut host = Host::start(&cfg, c.path(), &[]);
        // Die after a random number of batches (there are ~200), at a random
        // point of the next one: folding, storing, or committing offsets.
        let r = next_random(&mut rng);
        let after = 5 + (r >> 33) as usize % 35;
        poll(Duration::from_secs(60), || {
            (batches(&host) >= after).then_some(())
        })
        .unwrap_or_else(|| {
            panic!(
                "round {round}: no progress:\n{}",
                tail(&host.log_text(), 40)
            )
        });
        std::thread::sleep(Duration::from_millis((r >> 20) % 300));
        host.kill();
        let batches = batches(&host);
        committed_before_kills += batches;
        eprintln!("crash round {round}: killed after {batches} committed batches");
    }
    let host = Host::start(&cfg, c.path(), &[]);
    check_bank(&host, &lines, &expected, Duration::from_secs(150));
    let rest = batches(&host);
    eprintln!("after the crashes: {rest} batches");
    assert!(
        committed_before_kills > 0 && rest > 0,
        "the kills must land mid-stream ({committed_before_kills} batches before, {rest} after)"
    );
    let (_, dl) = host.get("/v1/dead-letters");
    assert_eq!(dl["count"], 0, "{dl}");
    // Histories span several buckets and read back whole, in order.
    let (code, v) = host.get("/v1/entities/account/c-0?at=45");
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["position"], 45, "{v}");
}

#[test]
fn a_rebalance_moves_partitions_without_loss_or_double_apply() {
    let _g = shared();
    let c = Cluster::new("rebalance");
    let (lines, expected) = generated_bank(20_000, 120, 23);
    let file = c.write_lines("events.jsonl", &lines);
    // Small batches: the stream lasts long enough to be split and moved.
    let cfg = c.config("host", 50, "", "");
    c.publish_changes(&cfg);
    let mut a = Host::start(&cfg, c.path(), &[]);
    produce(c.path(), &c.topic, &file, false);
    // Something is folded by A before B joins.
    let (seen_id, seen) = poll(Duration::from_secs(60), || {
        expected.keys().find_map(|id| {
            let (code, v) = a.get(&format!("/v1/entities/account/{id}"));
            (code == 200 && v["position"].as_u64().unwrap_or(0) > 0).then(|| (id.clone(), v))
        })
    })
    .unwrap_or_else(|| panic!("host A folded nothing:\n{}", tail(&a.log_text(), 40)));
    let reported = |h: &Host| -> Vec<String> {
        let (_, v) = h.get("/healthz");
        v["partitions"]
            .as_object()
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    };
    let b = Host::start(&cfg, c.path(), &[]);
    // The group rebalances: A gives up partitions, B gets some while A runs.
    poll(Duration::from_secs(30), || {
        b.log_text()
            .contains("Kafka partitions assigned")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "host B was never assigned partitions:\n{}",
            tail(&b.log_text(), 40)
        )
    });
    poll(Duration::from_secs(10), || {
        a.log_text()
            .contains("Kafka partitions revoked")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "host A never gave up partitions:\n{}",
            tail(&a.log_text(), 40)
        )
    });
    // What A cached of them goes with them (its lanes are told by the
    // source's rebalance callback).
    poll(Duration::from_secs(10), || {
        a.log_text()
            .contains("dropped the cached entities of revoked partitions")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "host A kept the cache of the partitions it gave up:\n{}",
            tail(&a.log_text(), 40)
        )
    });
    // A reports only the partitions it still reads: one it gave up with
    // lag would look stalled here for good while B reads it. Its health,
    // its lag gauges and its trend name the same partitions, fewer than
    // all of them (which it read alone).
    let lagged = |h: &Host| -> Vec<String> {
        let mut v: Vec<String> = h
            .metrics()
            .lines()
            .filter(|l| l.starts_with("refold_partition_lag{"))
            .filter_map(|l| {
                let part = l.split("partition=\"").nth(1)?.split('"').next()?;
                let src = l.split("source=\"").nth(1)?.split('"').next()?;
                Some(format!("{src}#{part}"))
            })
            .collect();
        v.sort();
        v
    };
    let trended = |h: &Host| -> Vec<String> {
        let (_, t) = h.get("/v1/partitions");
        t["partitions"]
            .as_array()
            .map(|p| {
                p.iter()
                    .map(|p| format!("{}#{}", p["source"].as_str().unwrap_or(""), p["partition"]))
                    .collect()
            })
            .unwrap_or_default()
    };
    poll(Duration::from_secs(20), || {
        let mut now = reported(&a);
        now.sort();
        let trend = trended(&a);
        (now.len() < PARTITIONS as usize
            && now == lagged(&a)
            && trend.iter().all(|t| now.contains(t)))
        .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "host A reports {:?} (lag gauges {:?}, trend {:?}) after giving up partitions",
            reported(&a),
            lagged(&a),
            trended(&a)
        )
    });
    std::thread::sleep(Duration::from_secs(2));
    // A dies without leaving the group: B takes over after the session timeout.
    a.kill();
    let a_batches = batches(&a);
    // B serves what A stored, and ends with everything exactly once.
    let (code, v) = b.get(&format!("/v1/entities/account/{seen_id}"));
    assert_eq!(code, 200, "{v}");
    assert!(
        v["position"].as_u64().unwrap() >= seen["position"].as_u64().unwrap(),
        "B sees A's work: {v} vs {seen}"
    );
    check_bank(&b, &lines, &expected, Duration::from_secs(150));
    let b_log = b.log_text();
    let assignments = b_log.matches("Kafka partitions assigned").count();
    eprintln!(
        "A committed {a_batches} batches; B {} batches, {assignments} assignments",
        b_log.matches("batch committed").count()
    );
    assert!(
        assignments >= 2,
        "B should get A's partitions after A died:\n{}",
        tail(&b_log, 40)
    );
    // Publishing moved with the partitions, and A's producers were fenced.
    // By position: the batches A's lanes held when its partitions moved
    // are committed after B's first read of them, swept up by B, and
    // published after B's records of their accounts.
    check_change_stream(&c, &b, &expected, Order::Position);
}

/// The config of a host that is killed and restarted: a static group
/// member (a restarted host takes its partitions back at once) with small
/// buckets (entities move to new partitions while hosts die).
fn restarting_member(c: &Cluster, member: &str, batch: usize) -> PathBuf {
    c.config(
        "host",
        batch,
        &format!("properties = {{ \"group.instance.id\" = \"{member}\" }}"),
        "bucket_size = 40",
    )
}

/// The next value of a seeded linear congruential generator (the kill
/// tests' random moments, the same in every run).
fn next_random(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state
}

/// Batches a host has committed so far (its log says each one).
fn batches(host: &Host) -> usize {
    host.log_text().matches("batch committed").count()
}

/// A cluster config whose `[engine]` section is `engine` (appended: the
/// last table of the file).
fn with_engine(cfg: &Path, engine: &str) {
    let mut text = std::fs::read_to_string(cfg).unwrap();
    text.push_str(&format!("\n[engine]\n{engine}\n"));
    std::fs::write(cfg, text).unwrap();
}

/// Twenty SIGKILLs at random moments of one stream (folding, writing,
/// committing offsets, starting up), with the next batch folded while the
/// one before is written: every state exact, every event stored and
/// applied once.
#[test]
fn twenty_sigkills_at_random_moments_lose_nothing_and_apply_nothing_twice() {
    let _g = shared();
    let c = Cluster::new("kills");
    let (lines, expected) = generated_bank(12_000, 120, 41);
    let file = c.write_lines("events.jsonl", &lines);
    produce(c.path(), &c.topic, &file, false);
    let cfg = restarting_member(&c, "kills-host", 60);
    c.publish_changes(&cfg);
    let started = Instant::now();
    let mut rng = 0xc0ffee_u64;
    let mut killed_mid_stream = 0;
    for round in 0..20 {
        let mut host = Host::start(&cfg, c.path(), &[]);
        let r = next_random(&mut rng);
        // Some rounds die before their first batch, most after a few.
        let after = (r >> 33) as usize % 6;
        poll(Duration::from_secs(30), || {
            (batches(&host) >= after).then_some(())
        });
        std::thread::sleep(Duration::from_millis((r >> 20) % 250));
        host.kill();
        let batches = batches(&host);
        if batches > 0 {
            killed_mid_stream += 1;
        }
        eprintln!("kill {round}: after {batches} committed batches");
    }
    let host = Host::start(&cfg, c.path(), &[]);
    check_bank(&host, &lines, &expected, Duration::from_secs(150));
    eprintln!("20 kills and the catch-up took {:?}", started.elapsed());
    assert!(
        killed_mid_stream >= 10,
        "most kills must land mid-stream ({killed_mid_stream} of 20 did)"
    );
    let (_, dl) = host.get("/v1/dead-letters");
    assert_eq!(dl["count"], 0, "{dl}");
    // Records of batches committed just before a kill were published by
    // the next run, none twice and none of a batch that did not commit.
    check_change_stream(&c, &host, &expected, Order::Topic);
}

/// A zombie: host A is paused (SIGSTOP) with batches in flight, its
/// partitions move to B, which goes on with more input; A resumes
/// (SIGCONT) and its late writes land. None of them wins over B's: every
/// state ends exact, every event stored and applied once.
#[test]
fn a_paused_host_that_resumes_after_its_partitions_moved_changes_nothing() {
    let _g = shared();
    let c = Cluster::new("zombie");
    let (lines, expected) = generated_bank(16_000, 100, 59);
    let (first, second) = lines.split_at(lines.len() / 2);
    let first = c.write_lines("first.jsonl", first);
    let second = c.write_lines("second.jsonl", second);
    // A short session: the group gives A's partitions away 6 s after A
    // stops answering.
    let cfg = c.config(
        "host",
        80,
        "properties = { \"session.timeout.ms\" = \"6000\", \"heartbeat.interval.ms\" = \"500\" }",
        "",
    );
    c.publish_changes(&cfg);
    produce(c.path(), &c.topic, &first, false);
    let mut a = Host::start(&cfg, c.path(), &[]);
    poll(Duration::from_secs(60), || (batches(&a) >= 5).then_some(()))
        .unwrap_or_else(|| panic!("host A committed nothing:\n{}", tail(&a.log_text(), 40)));
    let pid = a.child.id() as i32;
    signal(pid, "STOP");
    let paused = batches(&a);
    let moves = a.log_text().matches("Kafka partitions").count();
    let b = Host::start(&cfg, c.path(), &[]);
    produce(c.path(), &c.topic, &second, false);
    // B takes every partition once A's session is over, and advances.
    poll(Duration::from_secs(60), || {
        (batches(&b) >= 20).then_some(())
    })
    .unwrap_or_else(|| {
        signal(pid, "CONT");
        panic!("host B did not take over:\n{}", tail(&b.log_text(), 40))
    });
    signal(pid, "CONT");
    // A wakes up, finishes what it had in flight, finds its partitions
    // gone and rejoins the group.
    poll(Duration::from_secs(60), || {
        (a.log_text().matches("Kafka partitions").count() > moves).then_some(())
    })
    .unwrap_or_else(|| panic!("host A did not come back:\n{}", tail(&a.log_text(), 40)));
    check_bank(&b, &lines, &expected, Duration::from_secs(150));
    check_bank(&a, &lines, &expected, Duration::from_secs(30));
    // What A had in flight when it paused was published once if it applied
    // and not at all if it did not, whoever holds its partition now.
    check_change_stream(&c, &b, &expected, Order::Position);
    eprintln!(
        "A committed {paused} batches before its pause, {} in all; B {}",
        batches(&a),
        batches(&b)
    );
    a.kill();
}

/// Event ids that count per entity ("1", "2", … in every account), with
/// re-deliveries of earlier events, consumed by a host that a second one
/// joins mid-stream (a rebalance), each on three lanes whose owned-state
/// caches are far too small for the input: every state exact, every event
/// once.
#[test]
fn per_entity_ids_with_re_deliveries_across_a_rebalance_and_a_tiny_cache() {
    let _g = shared();
    let c = Cluster::new("localids");
    let (lines, expected) = crate::embedded::generated_bank_local_ids(12_000, 150, 71);
    let file = c.write_lines("events.jsonl", &lines);
    let cfg = c.config("host", 50, "", "");
    with_engine(&cfg, "state_cache_bytes = 4096\nlanes = 3");
    let a = Host::start(&cfg, c.path(), &[]);
    produce(c.path(), &c.topic, &file, false);
    poll(Duration::from_secs(60), || {
        (batches(&a) >= 10).then_some(())
    })
    .unwrap_or_else(|| panic!("host A committed nothing:\n{}", tail(&a.log_text(), 40)));
    let b = Host::start(&cfg, c.path(), &[]);
    poll(Duration::from_secs(30), || {
        b.log_text()
            .contains("Kafka partitions assigned")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "host B was never assigned partitions:\n{}",
            tail(&b.log_text(), 40)
        )
    });
    check_bank(&b, &lines, &expected, Duration::from_secs(150));
    let (_, dl) = b.get("/v1/dead-letters");
    assert_eq!(dl["count"], 0, "{dl}");
    let m = a.metrics();
    let evicted = m
        .lines()
        .find_map(|l| l.strip_prefix("refold_state_cache_evictions_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(evicted > 0.0, "the cache should have been too small:\n{m}");
}

/// SIGSTOP/SIGCONT of the local Cassandra: an unresponsive node (requests
/// time out, connections stall) rather than a restart, which is slow and
/// racy to automate. The host must wait, retry, and end exactly right.
struct Frozen(i32);

impl Frozen {
    fn freeze(pid: i32) -> Frozen {
        signal(pid, "STOP");
        Frozen(pid)
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn signal(pid: i32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "kill -{sig} {pid} failed");
}

fn cassandra_pid() -> i32 {
    let home = std::env::var("REFOLD_LOCAL_HOME").unwrap_or_else(|_| "/tmp/refold-local".into());
    let file = Path::new(&home).join("cassandra/cassandra.pid");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: this test freezes the Cassandra started by deploy/local/up",
            file.display()
        )
    });
    text.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{} holds {text:?}", file.display()))
}

/// Consume half of a large input, run `outage` (which produces the other
/// half while Cassandra is unavailable), then check the exact result and
/// that the host did see the outage.
fn survive_outage(what: &str, seed: u64, outage: impl FnOnce(&Cluster, i32, &Path)) {
    let c = Cluster::new(what);
    let pid = cassandra_pid();
    let (lines, expected) = generated_bank(12_000, 100, seed);
    let (first, second) = lines.split_at(lines.len() / 2);
    let first = c.write_lines("first.jsonl", first);
    let second = c.write_lines("second.jsonl", second);
    produce(c.path(), &c.topic, &first, false);
    let host = Host::start(&c.config("host", 200, "", ""), c.path(), &[]);
    poll(Duration::from_secs(60), || {
        (host.get("/v1/entities/account/c-0").0 == 200).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "nothing folded before the outage:\n{}",
            tail(&host.log_text(), 40)
        )
    });
    outage(&c, pid, &second);
    let back = Instant::now();
    check_bank(&host, &lines, &expected, Duration::from_secs(180));
    eprintln!("caught up {:?} after the outage", back.elapsed());
    let log = host.log_text();
    let waits =
        log.matches("store unavailable").count() + log.matches("Cassandra unavailable").count();
    eprintln!("the host waited out the outage with {waits} retries");
    assert!(
        waits > 0,
        "the host should have seen the outage:\n{}",
        tail(&log, 40)
    );
}

/// Cassandra stops answering (SIGSTOP) for 15 s while records arrive.
#[test]
fn an_unresponsive_cassandra_is_waited_out() {
    let _g = exclusive();
    survive_outage("freeze", 5, |c, pid, second| {
        let _frozen = Frozen::freeze(pid);
        let at = Instant::now();
        eprintln!("cassandra (pid {pid}) frozen");
        produce(c.path(), &c.topic, second, false);
        std::thread::sleep(Duration::from_secs(15).saturating_sub(at.elapsed()));
    });
}

/// A publisher that cannot publish (here: every topic asked for with more
/// replicas than the one broker has) makes `/healthz` unhealthy, with why,
/// once it has failed for `stuck_after_seconds`, while ingest goes on; its
/// records wait in the outbox and are each published once after a restart
/// that mends the configuration.
#[test]
fn a_stuck_change_publisher_is_reported_and_its_records_wait() {
    let _g = shared();
    let c = Cluster::new("stuck");
    let (lines, expected) = generated_bank(3_000, 40, 61);
    let file = c.write_lines("events.jsonl", &lines);
    produce(c.path(), &c.topic, &file, false);
    let cfg = c.config("host", 200, "", "");
    c.publish_changes(&cfg);
    let good = std::fs::read_to_string(&cfg).unwrap();
    let bad = good.replace(
        "replication_factor = 1\n",
        "replication_factor = 3\nstuck_after_seconds = 1\n",
    );
    assert_ne!(bad, good);
    std::fs::write(&cfg, bad).unwrap();
    let mut host = Host::start(&cfg, c.path(), &[]);
    check_bank(&host, &lines, &expected, Duration::from_secs(120));
    let health = poll(Duration::from_secs(60), || {
        let (code, v) = host.get("/healthz");
        (code == 503).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "a stuck publisher not reported:\n{}",
            tail(&host.log_text(), 40)
        )
    });
    let text = health.to_string();
    assert!(
        text.contains("sink:kafka") && text.contains("change cursor topic"),
        "{health}"
    );
    // With its cursor topic there, it claims its partitions and fails on
    // the change topic instead, and says so.
    create_topic(&format!("{}-changes-cursor", c.topic));
    poll(Duration::from_secs(60), || {
        let (code, v) = host.get("/healthz");
        (code == 503
            && v.to_string()
                .contains("publishing the change records of partition"))
        .then_some(())
    })
    .unwrap_or_else(|| panic!("{}", host.get("/healthz").1));
    let (code, _) = host.get("/v1/entities/account/c-0");
    assert_eq!(code, 200, "queries go on");
    host.kill();

    std::fs::write(&cfg, good).unwrap();
    let host = Host::start(&cfg, c.path(), &[]);
    check_change_stream(&c, &host, &expected, Order::Topic);
    let (code, v) = host.get("/healthz");
    assert_eq!(code, 200, "{v}");
}

/// The reference states of the bank plugin's v2: v1's plus the tier.
fn tiered(expected: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    expected
        .iter()
        .map(|(id, s)| {
            let mut s = s.clone();
            s["tier"] = json!(if s["balance"].as_i64().unwrap() >= 100_000 {
                "gold"
            } else {
                "standard"
            });
            (id.clone(), s)
        })
        .collect()
}

/// Wait for a rebuild to be done; its last status.
/// Give the hosts of `cfg` an admin API with `token`.
fn with_admin_token(cfg: &Path, token: &str) {
    let mut text = std::fs::read_to_string(cfg).unwrap();
    text.push_str(&format!("\n[admin]\ntoken = {token:?}\n"));
    std::fs::write(cfg, text).unwrap();
}

fn wait_rebuild(host: &Host, token: &str, id: &str) -> Value {
    poll(Duration::from_secs(180), || {
        let s = Admin::new(host, token).get(&format!("/v1/rebuilds/{id}"));
        assert_ne!(s["state"], "failed", "{s}\n{}", tail(&host.log_text(), 40));
        (s["state"] == "done").then_some(s)
    })
    .unwrap_or_else(|| panic!("rebuild not done:\n{}", tail(&host.log_text(), 40)))
}

#[test]
fn a_rebuild_on_cassandra_cuts_over_and_rolls_back() {
    let _g = shared();
    let c = Cluster::new("rebuild");
    let token = "cluster-admin";
    let (lines, expected) = generated_bank(8_000, 80, 31);
    let (first, second) = lines.split_at(5_000);
    let first = c.write_lines("first.jsonl", first);
    let second = c.write_lines("second.jsonl", second);
    produce(c.path(), &c.topic, &first, false);
    let cfg = c.config("host", 200, "", "bucket_size = 30");
    with_admin_token(&cfg, token);
    c.publish_changes(&cfg);
    let host = Host::start(&cfg, c.path(), &[]);
    poll(Duration::from_secs(60), || {
        (host.get("/v1/entities/account/c-0").0 == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("nothing folded:\n{}", tail(&host.log_text(), 40)));

    // A new version, rebuilt from the raw events in Cassandra while more arrive.
    let (code, v) =
        Admin::new(&host, token).put_plugin("account", &component("bank-v2"), "rebuild");
    assert_eq!(code, 201, "{v}");
    let id = v["rebuild"].as_str().expect("a rebuild id").to_string();
    produce(c.path(), &c.topic, &second, false);
    let status = wait_rebuild(&host, token, &id);
    assert_eq!(
        status["entities_done"], status["entities_total"],
        "{status}"
    );

    let tiered = tiered(&expected);
    check_bank(&host, &lines, &tiered, Duration::from_secs(120));
    // The rebuild refolded all history and published none of it: the
    // changes stay one per advance, and its cut-over published exactly one
    // correction per account (v2 adds a tier to every state), from a state
    // without a tier to one with it.
    let cut = Admin::new(&host, token).get("/v1/plugins/account")["active"]["seq"].clone();
    let at_cut = corrections_of(
        &read_change_topic(&c, &host, |records| {
            corrections_of(records, &cut).len() == expected.len()
        }),
        &cut,
    );
    assert_eq!(at_cut.len(), expected.len());
    for (id, r) in &at_cut {
        assert!(r["data"]["state"].get("tier").is_some(), "{id}: {r}");
        assert!(r["data"]["previous"].get("tier").is_none(), "{id}: {r}");
        assert_eq!(r["generation"], status["generation"], "{r}");
    }

    // Roll back: the archived generation returns, caught up, without tiers,
    // and so does one correction per account, back to the state queried.
    let (code, v) = Admin::new(&host, token).post("/v1/plugins/account/rollback", None);
    assert_eq!(code, 200, "{v}");
    check_bank(&host, &lines, &expected, Duration::from_secs(120));
    let states = wait_for_states(&host, "account", &expected, Duration::from_secs(60));
    let back = v["seq"].clone();
    let records = read_change_topic(&c, &host, |records| {
        corrections_of(records, &back).len() == expected.len()
    });
    let (changed, corrected) = check_changed_records(&records, &states, Order::Topic);
    assert_eq!(
        corrected,
        2 * expected.len(),
        "one per account and activation"
    );
    for (id, r) in corrections_of(&records, &back) {
        assert!(r["data"]["state"].get("tier").is_none(), "{id}: {r}");
        assert!(r["data"]["previous"].get("tier").is_some(), "{id}: {r}");
        assert_eq!(r["generation"], "", "{r}");
    }
    eprintln!(
        "change topic: {changed} changes and {corrected} corrections for {} accounts",
        expected.len()
    );
}

/// The cut-over of a rebuild is one step for the whole group: two hosts
/// share the partitions while events keep arriving; the rebuild runs on A,
/// and B, which learns of the activation only at its next registry poll,
/// keeps folding the old version meanwhile. From the moment the rebuild is
/// done, both hosts answer every entity from the new generation, and the
/// final states are exactly the new version's fold of every event, once.
#[test]
fn a_rebuild_cut_over_is_one_step_for_every_host() {
    let _g = shared();
    let c = Cluster::new("cutover");
    let token = "cluster-admin";
    let (lines, expected) = generated_bank(8_000, 60, 53);
    let (first, rest) = lines.split_at(3_000);
    let first = c.write_lines("first.jsonl", first);
    let chunks: Vec<PathBuf> = rest
        .chunks(500)
        .enumerate()
        .map(|(i, l)| c.write_lines(&format!("rest-{i}.jsonl"), l))
        .collect();
    produce(c.path(), &c.topic, &first, false);
    let cfg = c.config("host", 100, "", "bucket_size = 40");
    with_admin_token(&cfg, token);
    let a = Host::start(&cfg, c.path(), &[]);
    let b = Host::start(&cfg, c.path(), &[]);
    poll(Duration::from_secs(60), || {
        (a.get("/v1/entities/account/c-0").0 == 200).then_some(())
    })
    .unwrap_or_else(|| panic!("nothing folded:\n{}", tail(&a.log_text(), 40)));

    // Events keep flowing to both hosts across the cut-over.
    let dir = c.path().to_path_buf();
    let topic = c.topic.clone();
    let feeder = std::thread::spawn(move || {
        for f in chunks {
            produce(&dir, &topic, &f, false);
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    let (code, v) = Admin::new(&a, token).put_plugin("account", &component("bank-v2"), "rebuild");
    assert_eq!(code, 201, "{v}");
    let v2 = v["version"]["digest"].as_str().unwrap().to_string();
    let id = v["rebuild"].as_str().unwrap().to_string();
    wait_rebuild(&a, token, &id);

    // At once, before B's registry has necessarily caught up: every answer,
    // from either host, is a state of the new generation.
    for h in [&b, &a] {
        for n in 0..60 {
            let (code, v) = h.get(&format!("/v1/entities/account/c-{n}"));
            assert_eq!(code, 200, "{v}");
            assert!(
                v["state"].get("tier").is_some() && v["plugin"]["digest"] == json!(v2),
                "c-{n} answered from the old generation after the cut-over: {v}"
            );
        }
    }
    feeder.join().unwrap();
    let tiered = tiered(&expected);
    check_bank(&a, &lines, &tiered, Duration::from_secs(120));
    check_bank(&b, &lines, &tiered, Duration::from_secs(30));

    // A rollback on B is one step too, and finds the old generation's
    // states without refolding them from the start.
    let (code, v) = Admin::new(&b, token).post("/v1/plugins/account/rollback", None);
    assert_eq!(code, 200, "{v}");
    check_bank(&a, &lines, &expected, Duration::from_secs(30));
    check_bank(&b, &lines, &expected, Duration::from_secs(30));
}

/// An activation made on one host reaches the other host of the group (the
/// registry lives in Cassandra; hosts poll it each second), and so does a
/// rollback made on the other; events keep being applied exactly once.
#[test]
fn an_activation_on_one_host_reaches_every_host() {
    let _g = shared();
    let c = Cluster::new("propagate");
    let token = "cluster-admin";
    let cfg = c.config("host", 200, "", "");
    with_admin_token(&cfg, token);
    let a = Host::start(&cfg, c.path(), &[]);
    let b = Host::start(&cfg, c.path(), &[]);
    let running = |h: &Host| Admin::new(h, token).running_digest("account");
    let v1 = running(&a);
    assert_eq!(v1.len(), 64);
    let (code, v) = Admin::new(&a, token).put_plugin("account", &component("bank-v2"), "forward");
    assert_eq!(code, 201, "{v}");
    let v2 = v["version"]["digest"].as_str().unwrap().to_string();
    assert_eq!(
        running(&a),
        v2,
        "active at once on the host that took the upload"
    );
    let t0 = Instant::now();
    poll(Duration::from_secs(20), || {
        (running(&b) == v2).then_some(())
    })
    .unwrap_or_else(|| panic!("host B never picked up v2:\n{}", tail(&b.log_text(), 30)));
    let to_b = t0.elapsed();

    let (code, v) = Admin::new(&b, token).post("/v1/plugins/account/rollback", None);
    assert_eq!(code, 200, "{v}");
    let t1 = Instant::now();
    poll(Duration::from_secs(20), || {
        (running(&a) == v1).then_some(())
    })
    .unwrap_or_else(|| panic!("host A never rolled back:\n{}", tail(&a.log_text(), 30)));
    eprintln!(
        "activation propagation: A→B {:?}, rollback B→A {:?}",
        to_b,
        t1.elapsed()
    );

    let (lines, expected) = generated_bank(3_000, 40, 41);
    let file = c.write_lines("events.jsonl", &lines);
    produce(c.path(), &c.topic, &file, false);
    check_bank(&b, &lines, &expected, Duration::from_secs(120));
    check_bank(&a, &lines, &expected, Duration::from_secs(30));
}

/// A real restart of Cassandra mid-stream (graceful stop, then
/// `deploy/local/up` starts it again): the host waits and retries, commits
/// nothing it has not stored, and ends with the exact result.
#[test]
fn a_cassandra_restart_mid_stream_is_waited_out() {
    let _g = exclusive();
    survive_outage("restart", 9, |c, pid, second| {
        signal(pid, "TERM");
        poll(Duration::from_secs(120), || {
            (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
        })
        .unwrap_or_else(|| panic!("cassandra (pid {pid}) did not stop"));
        eprintln!("cassandra stopped");
        // Records keep arriving while the store is down.
        produce(c.path(), &c.topic, second, false);
        std::thread::sleep(Duration::from_secs(3));
        let up = std::process::Command::new(root().join("deploy/local/up"))
            .output()
            .expect("running deploy/local/up");
        assert!(
            up.status.success(),
            "restarting cassandra failed:\n{}{}",
            String::from_utf8_lossy(&up.stdout),
            String::from_utf8_lossy(&up.stderr)
        );
        eprintln!("cassandra restarted");
    });
}

/// Event ids that count per account, with re-deliveries, through Kafka into
/// Cassandra and across a SIGKILL: every account exact, every distinct
/// event stored and applied once (dedup is by entity and id, never by id
/// alone).
#[test]
fn per_entity_ids_with_redeliveries_fold_exactly_into_cassandra() {
    let _g = shared();
    let c = Cluster::new("localids");
    let (lines, expected) = crate::embedded::generated_bank_local_ids(6_000, 300, 5);
    let file = c.write_lines("events.jsonl", &lines);
    produce(c.path(), &c.topic, &file, false);
    let cfg = c.config(
        "host",
        100,
        "properties = { \"group.instance.id\" = \"localids-host\" }",
        "",
    );
    let mut host = Host::start(&cfg, c.path(), &[]);
    poll(Duration::from_secs(60), || {
        (batches(&host) >= 5).then_some(())
    })
    .unwrap_or_else(|| panic!("no progress:\n{}", tail(&host.log_text(), 40)));
    host.kill();
    let host = Host::start(&cfg, c.path(), &[]);
    check_bank(&host, &lines, &expected, Duration::from_secs(150));
}
