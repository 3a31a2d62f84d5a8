from cycles_proxy.cli import main

raise SystemExit(main())
