from evcharge.apps.cli import main

raise SystemExit(main())
