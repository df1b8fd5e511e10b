from vla.cli import main

raise SystemExit(main())
