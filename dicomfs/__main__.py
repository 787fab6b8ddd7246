from dicomfs.cli import main

raise SystemExit(main())
