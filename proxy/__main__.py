"""`python -m proxy` runs the CLI."""

from proxy.cli import main

raise SystemExit(main())
