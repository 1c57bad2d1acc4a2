import sys

from malhae.cli import main

sys.exit(main())
