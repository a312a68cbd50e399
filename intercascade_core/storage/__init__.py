"""Where strategies live outside one process's memory, and the indexes over them:
snapshots and the journal, PostgreSQL/pgvector and its sync queue, the hnswlib index,
export for fine-tuning."""
