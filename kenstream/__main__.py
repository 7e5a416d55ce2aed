import sys

try:
    from .cli import entry
except KeyboardInterrupt:  # Ctrl-C while the command line loads: one line, not a traceback
    sys.stderr.write("error: interrupted\n")
    sys.exit(130)

entry()
