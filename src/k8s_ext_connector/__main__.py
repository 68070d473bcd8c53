from k8s_ext_connector.cli import main

raise SystemExit(main())
