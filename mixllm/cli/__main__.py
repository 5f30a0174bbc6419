"""`python -m mixllm.cli`: the same as the `mixllm` command."""

import sys

from mixllm.cli.commands import app

sys.exit(app())
