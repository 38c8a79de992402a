"""`python -m ktrans` behaves exactly like the `ktrans` command."""

from ktrans.cli.main import main

raise SystemExit(main())
