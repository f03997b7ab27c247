"""What happened, written down: the recorder (log line, metrics, rows), Prometheus
metrics, the audit store (SQLite or PostgreSQL) with its writer process and reader."""
