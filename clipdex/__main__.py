import sys

from clipdex.cli import main

sys.exit(main())
