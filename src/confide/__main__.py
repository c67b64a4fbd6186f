"""`python -m confide`: the same as the `confide` command."""

from confide.cli import main

raise SystemExit(main())
