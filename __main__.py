from m3vit.cli import main

raise SystemExit(main())
