from evcharge.cli import main

raise SystemExit(main())
