"""The jobs: the table of training stages and `run_training`, the evaluation report, the promotion
gate, continual learning from feedback, a version judged on logged feedback, and the drift check.

Built from the library and the I/O layer; the CLI, the Prefect flows and DVC call them.
"""
