import sys

from nanoseek.serve.cli import main

sys.exit(main())
