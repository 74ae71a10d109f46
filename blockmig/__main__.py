from blockmig.cli import main

raise SystemExit(main())
