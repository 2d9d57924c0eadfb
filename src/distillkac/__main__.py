import sys

from distillkac.cli import main

sys.exit(main())
