import sys

from jaxlm.cli.main import main

sys.exit(main())
