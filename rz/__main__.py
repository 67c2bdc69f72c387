from rz.cli import main

raise SystemExit(main())
