"""MetaSchedule tuning: the search (search.py), the persistent per-target database (database.py), and
batches measured on a machine without the compiler (batch.py)."""
