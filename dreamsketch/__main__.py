import sys

try:  # Ctrl-C at any moment, the second or two of imports included: one line, nothing half written
    from dreamsketch.cli import main

    sys.exit(main())
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
