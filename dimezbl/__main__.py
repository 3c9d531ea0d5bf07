"""`python -m dimezbl <subcommand>`, the same as the `dimezbl` console script."""

from .cli import main

raise SystemExit(main())
