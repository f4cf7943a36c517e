import sys

from diffquant.cli import main

sys.exit(main())
