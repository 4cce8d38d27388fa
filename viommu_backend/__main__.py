from viommu_backend.cli import main

raise SystemExit(main())
