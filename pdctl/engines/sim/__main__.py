from pdctl.engines.sim.cli import main

raise SystemExit(main())
