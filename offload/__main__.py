"""``python -m offload SCRIPT|-m MODULE [ARGS...]``: run a program with ``cuda:0`` on the virtual
device when the platform is configured (``moai run`` starts programs this way, with it forced on)."""
import sys

from offload import autostart

autostart.run_program(sys.argv[1:])
