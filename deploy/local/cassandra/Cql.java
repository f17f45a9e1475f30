// Minimal CQL client for the local node, run by `deploy/local/tool cql`:
//   java -cp "LIB/cassandra/*" Cql.java HOST:PORT "STATEMENT" ["STATEMENT"...]
// Uses the DataStax Java driver 3.x that ships with cassandra-all, pinned to
// native protocol v4 (the version the engine's Rust driver speaks).
import com.datastax.driver.core.*;

public class Cql {
    public static void main(String[] args) {
        if (args.length < 2) {
            System.err.println("usage: Cql HOST:PORT STATEMENT...");
            System.exit(2);
        }
        String[] hp = args[0].split(":");
        try (Cluster cluster = Cluster.builder()
                .addContactPoint(hp[0])
                .withPort(Integer.parseInt(hp[1]))
                .withProtocolVersion(ProtocolVersion.V4)
                .withoutMetrics()
                .withoutJMXReporting()
                .build();
             Session session = cluster.connect()) {
            for (int i = 1; i < args.length; i++) {
                ResultSet rs = session.execute(args[i]);
                ColumnDefinitions cols = rs.getColumnDefinitions();
                if (cols.size() == 0) {
                    System.out.println("OK");
                    continue;
                }
                StringBuilder head = new StringBuilder();
                for (ColumnDefinitions.Definition d : cols) head.append(head.length() == 0 ? "" : " | ").append(d.getName());
                System.out.println(head);
                int n = 0;
                for (Row row : rs) {
                    StringBuilder line = new StringBuilder();
                    for (int c = 0; c < cols.size(); c++) line.append(c == 0 ? "" : " | ").append(row.getObject(c));
                    System.out.println(line);
                    n++;
                }
                System.out.println("(" + n + " rows)");
            }
        }
    }
}
