"""What happened, written down: the recorder (log line, metrics, rows), Prometheus
metrics, the SQLite store and its writer process."""
