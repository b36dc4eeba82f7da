import sys

from distlora.cli import main

sys.exit(main())
