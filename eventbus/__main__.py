"""``python -m eventbus``: inspect, replay and purge a SQLiteStore's dead letters (see _cli)."""

from eventbus._cli import main

raise SystemExit(main())
