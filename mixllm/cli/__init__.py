"""The `mixllm` command (`commands.py`; its data, registry, keys and evidence commands in their own
modules) and the local helper processes it starts. A thin shell: no logic of its own.

The command is imported only when `app` is asked for (the console script, `mixllm.cli:app`), so
importing one module of this folder, such as `processes`, does not load the whole command.
"""


def __getattr__(name: str):
    # `mixllm = "mixllm.cli:app"` (pyproject) reaches the command through here, on first use only.
    if name == "app":
        from mixllm.cli.commands import app

        return app
    raise AttributeError(f"module 'mixllm.cli' has no attribute {name!r}")
