import sys

from dreamsketch.cli import main

sys.exit(main())
