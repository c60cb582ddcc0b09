import sys

from evd.cli import main

sys.exit(main())
