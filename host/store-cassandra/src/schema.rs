//! The keyspace's tables (`CASSANDRA.md` gives the reasons for their
//! shape), the columns added since the first release, and the one function
//! that creates whatever is missing.

use anyhow::Context as _;
use scylla::client::session::Session;

use crate::config::CassandraConfig;

/// The CQL schema, `{ks}` standing for the keyspace. See `CASSANDRA.md`.
const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS {ks}.entity_log (
        entity_type    text,
        entity_id      text,
        bucket         bigint,
        kind           tinyint,
        position       bigint,
        event_id       text,
        source         text,
        event_type     text,
        event_time     text,
        data           text,
        origin         text,
        record         text,
        digest         text,
        base           bigint static,
        cap            bigint static,
        head           bigint static,
        state          text static,
        state_position bigint static,
        plugin_name    text static,
        plugin_version text static,
        plugin_digest  text static,
        quarantined    boolean static,
        live           bigint static,
        generation     text static,
        PRIMARY KEY ((entity_type, entity_id, bucket), kind, position, event_id)
    ) WITH comment = 'refold: raw events (kind 0), event-id index (kind 1) and state (static) of one bucket of an entity'",
    "CREATE TABLE IF NOT EXISTS {ks}.entity_index (
        entity_type text,
        shard       int,
        entity_id   text,
        PRIMARY KEY ((entity_type, shard), entity_id)
    ) WITH comment = 'refold: ids of the entities of a type (for rebuilds)'",
    "CREATE TABLE IF NOT EXISTS {ks}.projections (
        projection text,
        doc_key    text,
        body       text,
        PRIMARY KEY ((projection, doc_key))
    ) WITH comment = 'refold: read-model documents'",
    // The keys of each projection's documents, for listing them in pages:
    // `projections` is one partition per document, which only a full-table
    // scan could list. Written beside every document write, at the same
    // client timestamp, so that an upsert and a delete order the same way
    // in both tables.
    "CREATE TABLE IF NOT EXISTS {ks}.projection_index (
        projection text,
        shard      int,
        doc_key    text,
        PRIMARY KEY ((projection, shard), doc_key)
    ) WITH comment = 'refold: keys of the documents of a projection (for listings)'",
    "CREATE TABLE IF NOT EXISTS {ks}.dead_letters (
        shard       int,
        id          text,
        code        text,
        reason      text,
        payload     text,
        origin      text,
        event_id    text,
        entity_type text,
        recorded_at text,
        PRIMARY KEY ((shard), id)
    ) WITH comment = 'refold: input that could not become an event'",
    "CREATE TABLE IF NOT EXISTS {ks}.quarantine (
        entity_type    text,
        entity_id      text,
        event_id       text,
        event_position bigint,
        failure_kind   text,
        error          text,
        plugin_name    text,
        plugin_version text,
        plugin_digest  text,
        recorded_at    text,
        PRIMARY KEY ((entity_type, entity_id))
    ) WITH comment = 'refold: why an entity is quarantined'",
    "CREATE TABLE IF NOT EXISTS {ks}.snapshots (
        entity_type text,
        entity_id   text,
        digest      text,
        position    bigint,
        state       text,
        PRIMARY KEY ((entity_type, entity_id), digest, position)
    ) WITH CLUSTERING ORDER BY (digest ASC, position DESC)
      AND comment = 'refold: replay snapshots for past-position queries (state folded from the first event by one plugin)'",
    "CREATE TABLE IF NOT EXISTS {ks}.checkpoints (
        source      text,
        part        int,
        next_offset bigint,
        PRIMARY KEY ((source), part)
    ) WITH comment = 'refold: source positions reached by committed batches'",
    "CREATE TABLE IF NOT EXISTS {ks}.plugin_versions (
        entity_type text,
        digest      text,
        name        text,
        version     text,
        size        bigint,
        uploaded_at text,
        seq         bigint,
        PRIMARY KEY ((entity_type), digest)
    ) WITH comment = 'refold: uploaded plugin versions'",
    "CREATE TABLE IF NOT EXISTS {ks}.plugin_blobs (
        digest text,
        chunk  int,
        bytes  blob,
        PRIMARY KEY ((digest), chunk)
    ) WITH comment = 'refold: plugin components, in chunks'",
    "CREATE TABLE IF NOT EXISTS {ks}.activations (
        entity_type  text PRIMARY KEY,
        digest       text,
        previous     text,
        mode         text,
        seq          bigint,
        activated_at text,
        generation   text,
        previous_generation text,
        rolled_back  list<text>
    ) WITH comment = 'refold: the active plugin version of each entity type'",
    "CREATE TABLE IF NOT EXISTS {ks}.activation_history (
        entity_type text,
        seq         bigint,
        activation  text,
        PRIMARY KEY ((entity_type), seq)
    ) WITH CLUSTERING ORDER BY (seq DESC)
      AND comment = 'refold: every activation of each entity type, as JSON, newest first'",
    "CREATE TABLE IF NOT EXISTS {ks}.rebuilds (
        id             text PRIMARY KEY,
        entity_type    text,
        digest         text,
        generation     text,
        state          text,
        entities_done  bigint,
        entities_total bigint,
        events_done    bigint,
        events_total   bigint,
        quarantined    bigint,
        error          text,
        owner          text,
        started_at     text,
        finished_at    text,
        heartbeat_ms   bigint
    ) WITH comment = 'refold: rebuilds, their progress and the host running each'",
    "CREATE TABLE IF NOT EXISTS {ks}.pending_effects (
        id    text,
        seq   int,
        ts    bigint,
        chunk text,
        PRIMARY KEY ((id), seq)
    ) WITH comment = 'refold: read-model effects of commits in flight (redo intents)'
      AND gc_grace_seconds = 600 AND default_time_to_live = 604800",
    "CREATE TABLE IF NOT EXISTS {ks}.change_outbox (
        source        text,
        part          int,
        batch_id      text,
        entity_type   text,
        entity_id     text,
        change_id     text,
        last_position bigint,
        expected_head bigint,
        certain       boolean,
        event         text,
        PRIMARY KEY ((source, part), batch_id, entity_type, entity_id)
    ) WITH comment = 'refold: change records of committed (or committing) batches, per source partition, until published'",
];

/// Columns added after the first release, for keyspaces created before.
/// `ALTER TABLE ... ADD` fails when the column exists; that is the no-op.
const UPGRADES: &[&str] = &[
    "ALTER TABLE {ks}.entity_log ADD generation text static",
    "ALTER TABLE {ks}.activations ADD generation text",
    "ALTER TABLE {ks}.activations ADD previous_generation text",
    "ALTER TABLE {ks}.entity_log ADD record text",
    "ALTER TABLE {ks}.entity_log ADD digest text",
    "ALTER TABLE {ks}.activations ADD rolled_back list<text>",
];

/// Create the keyspace and the tables if missing, and add the columns of
/// [`UPGRADES`] to a keyspace created before them.
pub(crate) async fn create(session: &Session, config: &CassandraConfig) -> anyhow::Result<()> {
    let ks = &config.keyspace;
    let replication = match &config.replication {
        Some(r) => r.clone(),
        None => format!(
            "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
            config.replication_factor.max(1)
        ),
    };
    session
        .query_unpaged(
            format!("CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {replication}"),
            (),
        )
        .await
        .with_context(|| format!("creating keyspace {ks}"))?;
    for ddl in SCHEMA {
        session
            .query_unpaged(ddl.replace("{ks}", ks), ())
            .await
            .with_context(|| format!("creating the schema in keyspace {ks}"))?;
    }
    for ddl in UPGRADES {
        if let Err(e) = session.query_unpaged(ddl.replace("{ks}", ks), ()).await {
            let msg = e.to_string();
            anyhow::ensure!(
                msg.contains("already exist") || msg.contains("conflicts with"),
                "upgrading the schema in keyspace {ks}: {msg}"
            );
        }
    }
    Ok(())
}
