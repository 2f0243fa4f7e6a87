"""`python -m fusionnet` is the `fusionnet` command."""

from fusionnet.cli import main

raise SystemExit(main())
