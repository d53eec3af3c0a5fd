"""``python -m relayd``: the ``relayd`` command, for when the console script is not on PATH."""

from relayd.cli import main

main(prog_name="relayd")
