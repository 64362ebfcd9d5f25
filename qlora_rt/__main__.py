from qlora_rt.cli import main

raise SystemExit(main())
