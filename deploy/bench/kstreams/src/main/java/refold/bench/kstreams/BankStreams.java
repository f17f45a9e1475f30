package refold.bench.kstreams;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.node.ObjectNode;
import java.io.BufferedWriter;
import java.io.IOException;
import java.lang.management.ManagementFactory;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.Set;
import java.util.UUID;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutionException;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicReference;
import java.util.stream.Collectors;
import java.util.stream.Stream;
import org.apache.kafka.clients.admin.Admin;
import org.apache.kafka.clients.admin.AdminClientConfig;
import org.apache.kafka.clients.admin.TopicDescription;
import org.apache.kafka.common.errors.UnknownTopicOrPartitionException;
import org.apache.kafka.common.serialization.Serdes;
import org.apache.kafka.common.utils.AppInfoParser;
import org.apache.kafka.common.utils.Bytes;
import org.apache.kafka.streams.CloseOptions;
import org.apache.kafka.streams.KafkaStreams;
import org.apache.kafka.streams.KeyValue;
import org.apache.kafka.streams.StoreQueryParameters;
import org.apache.kafka.streams.StreamsBuilder;
import org.apache.kafka.streams.StreamsConfig;
import org.apache.kafka.streams.errors.InvalidStateStoreException;
import org.apache.kafka.streams.errors.StreamsUncaughtExceptionHandler;
import org.apache.kafka.streams.kstream.Consumed;
import org.apache.kafka.streams.kstream.Grouped;
import org.apache.kafka.streams.kstream.Materialized;
import org.apache.kafka.streams.state.KeyValueIterator;
import org.apache.kafka.streams.state.KeyValueStore;
import org.apache.kafka.streams.state.QueryableStoreTypes;
import org.apache.kafka.streams.state.ReadOnlyKeyValueStore;

/**
 * refold's bank fold as a Kafka Streams application: stream -> groupByKey ->
 * aggregate into the default (RocksDB, cached, changelogged) key-value store.
 * Runs until N records have been aggregated, then reports one JSON line on
 * stdout. Exit codes: 0 done, 1 bad usage or setup, 2 timeout, 3 the Streams
 * client failed.
 */
public final class BankStreams {
    static final String STORE = "accounts";

    static final class Options {
        String brokers = "127.0.0.1:9092";
        String topic;
        long events = -1;
        int threads = 0;
        long timeoutSeconds = 1800;
        Path statesOut;
        int show = 0;
        boolean keepTopics = false;
        String guarantee = StreamsConfig.AT_LEAST_ONCE;
    }

    static final class Usage extends Exception {
        Usage(String m) {
            super(m);
        }
    }

    static final String USAGE = String.join("\n",
            "usage: BankStreams --topic T --events N [--brokers B] [--threads K]",
            "                   [--timeout SECONDS] [--states-out FILE] [--show K] [--keep-topics]",
            "                   [--guarantee at_least_once|exactly_once_v2]");

    static Options parse(String[] args) throws Usage {
        Options o = new Options();
        for (int i = 0; i < args.length; i++) {
            String a = args[i];
            if (a.equals("--keep-topics")) {
                o.keepTopics = true;
                continue;
            }
            if (i + 1 >= args.length) {
                throw new Usage("missing value after " + a);
            }
            String v = args[++i];
            try {
                switch (a) {
                    case "--brokers" -> o.brokers = v;
                    case "--topic" -> o.topic = v;
                    case "--events" -> o.events = Long.parseLong(v);
                    case "--threads" -> o.threads = Integer.parseInt(v);
                    case "--timeout" -> o.timeoutSeconds = Long.parseLong(v);
                    case "--states-out" -> o.statesOut = Paths.get(v);
                    case "--show" -> o.show = Integer.parseInt(v);
                    case "--guarantee" -> o.guarantee = v;
                    default -> throw new Usage("unknown argument " + a);
                }
            } catch (NumberFormatException e) {
                throw new Usage("not a number after " + a + ": " + v);
            }
        }
        if (o.topic == null || o.events < 1) {
            throw new Usage("--topic and --events (>= 1) are required");
        }
        if (!o.guarantee.equals(StreamsConfig.AT_LEAST_ONCE)
                && !o.guarantee.equals(StreamsConfig.EXACTLY_ONCE_V2)) {
            throw new Usage("--guarantee is at_least_once or exactly_once_v2, not " + o.guarantee);
        }
        if (o.threads < 0 || o.timeoutSeconds < 1) {
            throw new Usage("--threads must be >= 1 and --timeout >= 1");
        }
        return o;
    }

    public static void main(String[] args) {
        // Before the first logger exists; the command line may still override it.
        System.getProperties().putIfAbsent("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        // Two warnings about defaults this run keeps on purpose (no global
        // tables, a temporary state directory) would otherwise be repeated
        // on every run.
        System.getProperties().putIfAbsent("org.slf4j.simpleLogger.log.org.apache.kafka.streams.StreamsConfig", "error");
        System.getProperties().putIfAbsent(
                "org.slf4j.simpleLogger.log.org.apache.kafka.streams.processor.internals.StateDirectory", "error");
        Options o;
        try {
            o = parse(args);
        } catch (Usage u) {
            System.err.println("error: " + u.getMessage() + "\n" + USAGE);
            System.exit(1);
            return;
        }
        int code;
        try {
            code = run(o);
        } catch (Failure f) {
            System.err.println("error: " + f.getMessage());
            code = f.code;
        }
        System.exit(code);
    }

    static final class Failure extends Exception {
        final int code;

        Failure(int code, String m) {
            super(m);
            this.code = code;
        }
    }

    // Written by the stream threads, read by main.
    static final AtomicLong aggregated = new AtomicLong();
    static final AtomicLong errors = new AtomicLong();
    static final AtomicLong firstNanos = new AtomicLong();
    static final AtomicLong firstWallMillis = new AtomicLong();
    static final AtomicLong doneNanos = new AtomicLong();
    static final AtomicReference<Throwable> failure = new AtomicReference<>();

    static int run(Options o) throws Failure {
        Properties adminProps = new Properties();
        adminProps.put(AdminClientConfig.BOOTSTRAP_SERVERS_CONFIG, o.brokers);
        // Short timeouts so that an unreachable broker is reported in seconds, not minutes.
        adminProps.put(AdminClientConfig.REQUEST_TIMEOUT_MS_CONFIG, 10_000);
        adminProps.put(AdminClientConfig.DEFAULT_API_TIMEOUT_MS_CONFIG, 15_000);
        try (Admin admin = Admin.create(adminProps)) {
            int partitions = partitions(admin, o);
            int cores = Runtime.getRuntime().availableProcessors();
            int threads = o.threads > 0 ? o.threads : Math.max(1, Math.min(partitions, cores));
            // A fresh application.id per run: no committed offsets, no old
            // changelog, so every run reads the topic from its start.
            String appId = "refold-peer-bank-" + UUID.randomUUID().toString().substring(0, 8);
            Path stateDir;
            try {
                stateDir = Files.createTempDirectory("refold-peer-kstreams-");
            } catch (IOException e) {
                throw new Failure(1, "cannot create a state directory: " + e);
            }
            try {
                return measure(o, admin, partitions, threads, appId, stateDir);
            } finally {
                deleteTree(stateDir);
                if (!o.keepTopics) {
                    dropLeftovers(admin, appId);
                }
            }
        }
    }

    static int partitions(Admin admin, Options o) throws Failure {
        try {
            TopicDescription d = admin.describeTopics(List.of(o.topic)).allTopicNames()
                    .get(20, TimeUnit.SECONDS).get(o.topic);
            return d.partitions().size();
        } catch (ExecutionException e) {
            if (e.getCause() instanceof UnknownTopicOrPartitionException) {
                throw new Failure(1, "topic " + o.topic + " does not exist on " + o.brokers);
            }
            throw new Failure(1, "cannot describe topic " + o.topic + " on " + o.brokers + ": " + e.getCause());
        } catch (java.util.concurrent.TimeoutException e) {
            throw new Failure(1, "broker not reachable at " + o.brokers + " (no answer in 20 s)");
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            throw new Failure(1, "interrupted");
        }
    }

    static int measure(Options o, Admin admin, int partitions, int threads, String appId, Path stateDir)
            throws Failure {
        Properties p = new Properties();
        p.put(StreamsConfig.APPLICATION_ID_CONFIG, appId);
        p.put(StreamsConfig.BOOTSTRAP_SERVERS_CONFIG, o.brokers);
        // Changed: the default (/tmp/kafka-streams) would outlive the run; this
        // temporary directory is deleted afterwards.
        p.put(StreamsConfig.STATE_DIR_CONFIG, stateDir.toString());
        // Changed: the default is 1 thread; one per input partition, capped at
        // the cores, lets Streams use the machine as refold does.
        p.put(StreamsConfig.NUM_STREAM_THREADS_CONFIG, threads);
        // Streams already defaults its consumer to "earliest"; set explicitly
        // because the measurement depends on it.
        p.put(StreamsConfig.consumerPrefix("auto.offset.reset"), "earliest");
        // Changed when asked: exactly_once_v2 (transactions over the output,
        // the changelog and the offsets, commit every 100 ms) is what refold
        // offers, so it is the fair peer; at_least_once is the default.
        p.put(StreamsConfig.PROCESSING_GUARANTEE_CONFIG, o.guarantee);
        // Everything else is Kafka Streams' default: commit every 30 s
        // (100 ms exactly-once), a 10 MiB record cache, RocksDB stores with a
        // changelog, internal topics with the broker's default replication.

        long target = o.events;
        CountDownLatch finished = new CountDownLatch(1);
        StreamsBuilder b = new StreamsBuilder();
        b.stream(o.topic, Consumed.with(Serdes.String(), Serdes.ByteArray()))
                .groupByKey(Grouped.with(Serdes.String(), Serdes.ByteArray()))
                .aggregate(Account::initial, (key, value, account) -> {
                    firstNanos.compareAndSet(0, System.nanoTime());
                    firstWallMillis.compareAndSet(0, System.currentTimeMillis());
                    try {
                        account.apply(AccountSerde.JSON.readTree(value));
                    } catch (Account.FoldError | IOException | RuntimeException e) {
                        // apply() assigns nothing before its checks pass, so the
                        // state is the one read from the store.
                        errors.incrementAndGet();
                    }
                    if (aggregated.incrementAndGet() == target) {
                        doneNanos.set(System.nanoTime());
                        finished.countDown();
                    }
                    return account;
                }, Materialized.<String, Account, KeyValueStore<Bytes, byte[]>>as(STORE)
                        .withKeySerde(Serdes.String())
                        .withValueSerde(new AccountSerde()));

        KafkaStreams streams = new KafkaStreams(b.build(), p);
        streams.setUncaughtExceptionHandler(e -> {
            failure.compareAndSet(null, e);
            finished.countDown();
            return StreamsUncaughtExceptionHandler.StreamThreadExceptionResponse.SHUTDOWN_CLIENT;
        });
        streams.setStateListener((now, before) -> {
            if (now == KafkaStreams.State.ERROR) {
                failure.compareAndSet(null, new IllegalStateException("Kafka Streams went to ERROR"));
                finished.countDown();
            }
        });

        long jvmStartMillis = ManagementFactory.getRuntimeMXBean().getStartTime();
        long startCallMillis = System.currentTimeMillis();
        streams.start();
        boolean done;
        try {
            done = finished.await(o.timeoutSeconds, TimeUnit.SECONDS);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
            done = false;
        }
        Throwable f = failure.get();
        if (!done || f != null) {
            streams.close(closeOptions(Duration.ofSeconds(30)));
            if (f != null) {
                throw new Failure(3, "Kafka Streams failed after " + aggregated.get() + " records: " + f);
            }
            throw new Failure(2, "timed out after " + o.timeoutSeconds + " s: " + aggregated.get() + " of "
                    + target + " records aggregated (does the topic hold that many?)");
        }
        double seconds = (doneNanos.get() - firstNanos.get()) / 1e9;

        Map<String, Object> out = new LinkedHashMap<>();
        out.put("events", target);
        out.put("seconds", round(seconds, 3));
        out.put("events_per_second", seconds > 0 ? Math.round(target / seconds) : null);
        out.put("threads", threads);
        out.put("guarantee", o.guarantee);
        out.put("errors", errors.get());
        out.put("startup_seconds", round((firstWallMillis.get() - jvmStartMillis) / 1e3, 2));
        out.put("startup_after_start_seconds", round((firstWallMillis.get() - startCallMillis) / 1e3, 2));

        if (o.statesOut != null || o.show > 0) {
            long t = System.nanoTime();
            long entities = readStates(streams, o);
            out.put("entities", entities);
            out.put("seconds_to_read_states", round((System.nanoTime() - t) / 1e9, 3));
        }

        // close() flushes the record cache into RocksDB and the changelog,
        // waits for the changelog writes and commits the input offsets: only
        // then is the work durable, so its cost is reported too.
        long t = System.nanoTime();
        boolean closed = streams.close(closeOptions(Duration.ofSeconds(120)));
        double toClose = (System.nanoTime() - t) / 1e9;
        out.put("seconds_to_close", round(toClose, 3));
        out.put("events_per_second_with_close", Math.round(target / (seconds + toClose)));
        out.put("closed_cleanly", closed);
        out.put("aggregated_total", aggregated.get());
        out.put("partitions", partitions);
        out.put("kafka_streams_version", AppInfoParser.getVersion());
        out.put("application_id", appId);

        ObjectNode json = AccountSerde.JSON.valueToTree(out);
        System.out.println(json.toString());
        return 0;
    }

    /**
     * Changed from the default close(): leaving the group (one request) lets
     * the run delete its consumer group at once instead of after the session
     * timeout.
     */
    static CloseOptions closeOptions(Duration timeout) {
        return CloseOptions.groupMembershipOperation(CloseOptions.GroupMembershipOperation.LEAVE_GROUP)
                .withTimeout(timeout);
    }

    /** Every entity's state through an interactive query, before close(). */
    static long readStates(KafkaStreams streams, Options o) throws Failure {
        ReadOnlyKeyValueStore<String, Account> store = null;
        for (int i = 0; store == null; i++) {
            try {
                store = streams.store(StoreQueryParameters.fromNameAndType(STORE,
                        QueryableStoreTypes.<String, Account>keyValueStore()));
            } catch (InvalidStateStoreException e) {
                // A rebalance can hide the store for a moment.
                if (i >= 100) {
                    throw new Failure(3, "the store cannot be queried: " + e.getMessage());
                }
                sleep(100);
            }
        }
        long n = 0;
        List<String> shown = new ArrayList<>();
        BufferedWriter w = null;
        try {
            if (o.statesOut != null) {
                w = Files.newBufferedWriter(o.statesOut, StandardCharsets.UTF_8);
            }
            try (KeyValueIterator<String, Account> it = store.all()) {
                while (it.hasNext()) {
                    KeyValue<String, Account> kv = it.next();
                    ObjectNode line = AccountSerde.JSON.createObjectNode();
                    line.put("entity_id", kv.key);
                    line.set("state", AccountSerde.JSON.valueToTree(kv.value));
                    String s = line.toString();
                    if (w != null) {
                        w.write(s);
                        w.write('\n');
                    }
                    if (shown.size() < o.show) {
                        shown.add(s);
                    }
                    n++;
                }
            }
            if (w != null) {
                w.close();
            }
        } catch (IOException e) {
            throw new Failure(1, "writing " + o.statesOut + ": " + e);
        }
        for (String s : shown) {
            System.err.println(s);
        }
        return n;
    }

    /** The changelog topic and consumer group a fresh application.id leaves on the broker. */
    static void dropLeftovers(Admin admin, String appId) {
        try {
            Set<String> mine = admin.listTopics().names().get(20, TimeUnit.SECONDS).stream()
                    .filter(t -> t.startsWith(appId + "-")).collect(Collectors.toSet());
            if (!mine.isEmpty()) {
                admin.deleteTopics(mine).all().get(20, TimeUnit.SECONDS);
            }
            admin.deleteConsumerGroups(List.of(appId)).all().get(20, TimeUnit.SECONDS);
        } catch (Exception e) {
            System.err.println("warning: could not delete the internal topics/group of " + appId + ": " + e);
        }
    }

    static void deleteTree(Path dir) {
        if (!Files.exists(dir)) {
            return;
        }
        try (Stream<Path> s = Files.walk(dir)) {
            s.sorted(Comparator.reverseOrder()).forEach(x -> x.toFile().delete());
        } catch (IOException e) {
            System.err.println("warning: could not delete " + dir + ": " + e);
        }
    }

    static Double round(double v, int places) {
        double m = Math.pow(10, places);
        return Math.round(v * m) / m;
    }

    static void sleep(long ms) {
        try {
            Thread.sleep(ms);
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        }
    }
}
