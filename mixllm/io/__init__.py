"""Everything that reads or writes outside the process: log files (read, validated, quarantined), the
Parquet training store and its split, the decision and feedback log (SQLite or PostgreSQL) with the
ledger and sessions beside it, the MLflow registry (the only module that imports mlflow), the training
stages' work folder and the benchmarks' list of logs.

Imports `mixllm.core` and `mixllm.config`.
"""
