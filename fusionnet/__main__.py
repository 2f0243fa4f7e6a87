"""`python -m fusionnet` is the `fusionnet` command."""

from fusionnet.cli.main import main

raise SystemExit(main())
