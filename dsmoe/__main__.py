import sys

from dsmoe.cli import main

sys.exit(main())
