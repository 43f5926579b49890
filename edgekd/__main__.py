from edgekd.cli import main

raise SystemExit(main())
