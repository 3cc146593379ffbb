import sys

from jtinker.cli import main

sys.exit(main())
