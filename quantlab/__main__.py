import sys

from quantlab.cli import main

sys.exit(main())
